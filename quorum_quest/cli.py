"""`quorum-quest-service`: run the lock service.

    quorum-quest-service [-config=PATH | --config PATH]

PATH is a config file or a directory holding config.yaml, config.yml,
quorum-quest.yaml or quorum-quest.yml; a PATH without one is a config error. With no
flag, ./config is searched the same way, and with no file found there the service
starts on its defaults (the embedded memory store at localhost:5050) and the
environment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

try:
    from loguru import logger

    from quorum_quest.config.loader import DEFAULT_PATH, find_config_file, load_settings, read_yaml
    from quorum_quest.config.settings import Settings
    from quorum_quest.errors import ConfigError, StoreUnavailable
    from quorum_quest.server.app import CannotListen, check_address_free, check_files, serve
    from quorum_quest.server.workers import supervise, worker_index
    from quorum_quest.telemetry.logging import configure_logging
except ModuleNotFoundError as exc:  # the SDK alone: the service's packages are an extra
    missing = (exc.name or "quorum_quest").partition(".")[0]
    if missing == "quorum_quest":
        raise
    sys.exit(
        f"quorum-quest-service: the service needs the {missing!r} package, which is not"
        " installed: install quorum-quest[server]"
    )

EXIT_CONFIG = 2
EXIT_CANNOT_START = 1  # the address cannot be bound, or the store cannot be reached


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quorum-quest-service", description="Quorum Quest distributed lock service"
    )
    parser.add_argument(
        "-config",
        "--config",
        dest="config",
        type=Path,
        default=None,
        help=f"config file, or a directory holding config.yaml (default: ./{DEFAULT_PATH})",
    )
    return parser


def _store_in_use(settings: Settings) -> str:
    backend = settings.backend.type
    if backend == "memory":
        return "the embedded memory store"
    return f"the {backend} store the environment selects"


def _run(settings: Settings, file: Path | None, *, reuse_port: bool) -> None:
    """Serve on uvloop when configured and installed, else on asyncio's own loop."""
    loop_factory = None
    if settings.server.uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            logger.info("uvloop is not installed")
    logger.info("event loop: {}", "uvloop" if loop_factory else "asyncio")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, file, reuse_port=reuse_port))


def _config_error(exc: ConfigError) -> int:
    """One line per mistake, each naming its key path, so that all can be fixed at once."""
    for path, reason in exc.mistakes:
        message = " ".join((f"{path}: {reason}" if path else reason).splitlines())
        print(f"quorum-quest-service: config error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _cannot_start(exc: Exception) -> int:
    """One ERROR line naming what stopped the start, without a traceback."""
    logger.error("cannot start: {}", exc)
    return EXIT_CANNOT_START


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        file = find_config_file(args.config)
        settings = load_settings(file)
        empty = file is not None and not read_yaml(file)
        check_files(settings)
    except ConfigError as exc:
        return _config_error(exc)
    configure_logging(settings.logger)
    if file is None:
        logger.info("no config file found at {}; using {}", DEFAULT_PATH, _store_in_use(settings))
    else:
        logger.info("config loaded from {}", file)
        if empty:
            logger.warning("{} is empty: every key has its default", file)
    worker = worker_index()
    if worker is None and settings.server.workers > 1:
        try:  # said once here, rather than by every worker and then the supervisor
            check_address_free(settings.serverAddress, reuse_port=True)
        except CannotListen as exc:
            return _cannot_start(exc)
        return supervise(argv, settings.server.workers, settings.server.shutdownGrace)
    if worker is not None:
        logger.configure(extra={"worker": worker})
    try:
        _run(settings, file, reuse_port=worker is not None)
    except ConfigError as exc:  # a certificate or tokens file that changed since the check
        return _config_error(exc)
    except (StoreUnavailable, OSError) as exc:  # CannotListen is an OSError
        return _cannot_start(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
