"""Find, read and validate the configuration: YAML file, then environment overrides.

Environment variables `QUORUMQUEST_<SECTION>_<KEY>` (or `QUORUMQUEST_<KEY>` for a
top-level key) win over the file. Names are matched without regard to case or
underscores, so `QUORUMQUEST_SERVERADDRESS` sets `serverAddress` and
`QUORUMQUEST_STORE_ACCESSKEYID` sets `store.accessKeyId`. The environment is layered
onto the file here, before validation, because the `store:` keys depend on the
backend, which may itself come from either source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from quorum_quest.config.settings import Settings
from quorum_quest.errors import ConfigError
from quorum_quest.stores import UnknownBackend, store_class
from quorum_quest.stores.registry import canonical_name

ENV_PREFIX = "QUORUMQUEST_"
CANDIDATE_NAMES = ("config.yaml", "config.yml", "quorum-quest.yaml", "quorum-quest.yml")
DEFAULT_PATH = Path("config")


def find_config_file(path: Path) -> Path | None:
    """`path` itself if it is a file; in a directory, the first candidate name present."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in CANDIDATE_NAMES:
            if (path / name).is_file():
                return path / name
        return None
    if path != DEFAULT_PATH:
        raise ConfigError("", f"config path {str(path)!r} does not exist")
    return None


def read_yaml(file: Path, *, allow_empty: bool = True) -> dict[str, Any]:
    """The file's mapping of keys. An empty file (or one of comments only) is no keys at
    all, or with `allow_empty=False` an error: a reload never takes a file saved empty
    (truncated just before a write) for a configuration of all defaults."""
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read {file}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(
            "", f"{file} is not valid YAML{at}: {getattr(exc, 'problem', exc)}"
        ) from exc
    if document is None:
        if not allow_empty:
            raise ConfigError(
                "",
                f"{file} is empty (a file is often truncated just before it is written);"
                " it is not applied",
            )
        return {}
    if not isinstance(document, dict):
        raise ConfigError("", f"{file} must hold a mapping of keys, not {type(document).__name__}")
    return document


def load_settings(
    file: Path | None, environ: Mapping[str, str] | None = None, *, allow_empty: bool = True
) -> Settings:
    """Validate the file (if any) with the environment layered on top; an empty file is
    an error unless `allow_empty` (see `read_yaml`)."""
    raw = read_yaml(file, allow_empty=allow_empty) if file is not None else {}
    apply_environment(raw, os.environ if environ is None else environ)
    return validate(raw)


def validate(raw: dict[str, Any]) -> Settings:
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc) from None
    try:
        store = settings.store_settings()
    except ValidationError as exc:
        raise _config_error(exc, prefix="store") from None
    if settings.server.workers > 1:
        if settings.backend.type == "memory":
            raise ConfigError(
                "server.workers",
                "the memory store keeps its locks inside one process, so it can have only"
                " 1 worker; use a shared backend (redis, scylladb, dynamodb) for more",
            )
        if settings.serverAddress.rsplit(":", 1)[-1] == "0":
            raise ConfigError(
                "server.workers", "several workers need a fixed port in serverAddress"
            )
        if settings.observability.prometheusPort:
            raise ConfigError(
                "observability.prometheusPort",
                "cannot be used with server.workers > 1 (each worker would need its own port);"
                " push metrics over OTLP instead",
            )
    if store.ttl > settings.server.maxTtl:
        raise ConfigError(
            "store.ttl",
            f"the default lease ({store.ttl} s) is above "
            f"server.maxTtl ({settings.server.maxTtl:g} s)",
        )
    return settings


def _config_error(exc: ValidationError, prefix: str = "") -> ConfigError:
    error = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    reason = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        reason = "unknown key"
    more = len(exc.errors()) - 1
    return ConfigError(path, reason + (f" (and {more} more)" if more else ""))


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def _match(name: str, candidates: Any) -> str | None:
    by_squashed = {_squash(candidate): candidate for candidate in candidates}
    return by_squashed.get(_squash(name))


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Layer `QUORUMQUEST_*` variables onto `raw` (in place), matching names loosely."""
    overrides = {
        name[len(ENV_PREFIX) :]: value
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX)
    }
    # The backend decides which store keys exist, so it is settled first.
    for name in sorted(overrides, key=lambda n: _squash(n) != "backendtype"):
        _apply_one(raw, name, overrides[name])


def _apply_one(raw: dict[str, Any], name: str, value: str) -> None:
    fields = Settings.model_fields
    top = _match(name, fields)
    value = _parse(value)
    if top is not None and not _is_section(top):
        raw[top] = value
        return
    section_name, _, key = name.partition("_")
    section = _match(section_name, fields)
    if section is None or not key:
        raise ConfigError(ENV_PREFIX + name, "environment variable names no known key")
    target = raw.get(section)
    if not isinstance(target, dict):
        target = raw[section] = {}
    known = _store_keys(raw) if section == "store" else fields[section].annotation.model_fields
    matched = _match(key, [*target, *known]) or key.lower()
    for existing in [k for k in target if _squash(k) == _squash(matched)]:
        del target[existing]
    target[matched] = value


def _is_section(field: str) -> bool:
    annotation = Settings.model_fields[field].annotation
    return field == "store" or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _store_keys(raw: dict[str, Any]) -> list[str]:
    backend = raw.get("backend")
    name = backend.get("type", "memory") if isinstance(backend, dict) else "memory"
    try:
        model = store_class(canonical_name(str(name))).settings_model
    except UnknownBackend:
        return []  # reported by the validation of backend.type
    return list(model.model_fields)


def _parse(value: str) -> Any:
    """A JSON list or mapping stays structured (`["a:1", "b:2"]`); anything else is text."""
    if value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value
