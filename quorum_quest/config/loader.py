"""Find, read and validate the configuration: YAML file, then environment overrides.

Environment variables `QUORUMQUEST_<SECTION>_<KEY>` (or `QUORUMQUEST_<KEY>` for a
top-level key, `QUORUMQUEST_<SECTION>_<SUBSECTION>_<KEY>` inside a nested section such
as `server.tls`) win over the file. Names are matched without regard to case or
underscores, so `QUORUMQUEST_SERVERADDRESS` sets `serverAddress` and
`QUORUMQUEST_STORE_ACCESSKEYID` sets `store.accessKeyId`. The environment is layered
onto the file here, before validation, because the `store:` keys depend on the
backend, which may itself come from either source.

Whatever a file or a variable holds, loading ends in `Settings` or in one
`ConfigError` naming the key, the variable or the file: never in another exception.
It names every mistake found, one per line (`ConfigError.mistakes`), so that a typo'd
key does not hide a wrong value next to it. The service exits 2 on it at start, and a
reload is rejected with it while the running configuration stays.

The client's variables (`quorum_quest._env.CLIENT_VARIABLES`: `QUORUMQUEST_ADDRESS`,
`QUORUMQUEST_TOKEN`, ...) share the prefix and are skipped: they may be set where the
service runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from quorum_quest._env import CLIENT_VARIABLES
from quorum_quest.config.settings import BackendSettings, Settings, split_address
from quorum_quest.errors import ConfigError
from quorum_quest.stores import StoreSettings, UnknownBackend, store_class
from quorum_quest.stores.registry import canonical_name

ENV_PREFIX = "QUORUMQUEST_"
CANDIDATE_NAMES = ("config.yaml", "config.yml", "quorum-quest.yaml", "quorum-quest.yml")
DEFAULT_PATH = Path("config")
# Every float key is a number of seconds (or a ratio). Bounded so that each one, in ms,
# fits every clock it is handed to: thread waits, timers, protobuf Durations.
MAX_SECONDS = 1_000_000_000  # about 31 years
MAX_INTEGER = 2**63 - 1
# Pydantic's errors for a number out of bounds: for nan or inf, "not finite" says more.
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# A mistake: the key path (or variable, or nothing for the file itself) and the reason.
Mistake = tuple[str, str]


def find_config_file(path: Path | None) -> Path | None:
    """The config file: `path` itself if it is a file, or in a directory the first
    candidate name present. A `path` the user gave must hold one; with none, ./config
    is searched the same way, and finding nothing there means "no file"."""
    given = path is not None
    path = DEFAULT_PATH if path is None else path
    try:
        if path.is_file():
            return path
        if path.is_dir():
            for name in CANDIDATE_NAMES:
                if (path / name).is_file():
                    return path / name
            if given:
                raise ConfigError(
                    "",
                    f"no config file in directory {path} (looked for {', '.join(CANDIDATE_NAMES)})",
                )
            return None
        if given and path.exists():
            raise ConfigError("", f"config path {str(path)!r} is neither a file nor a directory")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    if given:
        raise ConfigError("", f"config path {str(path)!r} does not exist")
    return None


def read_yaml(file: Path, *, allow_empty: bool = True) -> dict[str, Any]:
    """The file's mapping of keys. An empty file (or one of comments only) is no keys at
    all, or with `allow_empty=False` an error: a reload never takes a file saved empty
    (truncated just before a write) for a configuration of all defaults."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {file}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            "", f"{file} is not UTF-8 text (line {line}: byte 0x{data[exc.start]:02x})"
        ) from None
    try:
        document = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            "", f"{file} is not a text file (line {line}: character #x{code:04x})"
        ) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = _one_line(getattr(exc, "problem", None) or exc)
        raise ConfigError("", f"{file} is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError("", f"{file} nests too deeply to be a config file") from None
    except Exception as exc:  # a value PyYAML cannot build, e.g. an integer of 5,000 digits
        raise ConfigError("", f"{file} cannot be read as YAML: {_describe(exc)}") from None
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
    an error unless `allow_empty` (see `read_yaml`). Every failure is a `ConfigError`."""
    try:
        raw = read_yaml(file, allow_empty=allow_empty) if file is not None else {}
        refused = apply_environment(raw, os.environ if environ is None else environ)
        return validate(raw, refused)
    except ConfigError:
        raise
    except Exception as exc:  # a failure no check above foresaw: still one line, not a crash
        where = file if file is not None else "the configuration"
        raise ConfigError("", f"{where} cannot be loaded: {_describe(exc)}") from exc


def validate(raw: dict[str, Any], refused: Sequence[Mistake] = ()) -> Settings:
    """`raw` as `Settings`, or a `ConfigError` naming every mistake in it, after those of
    `refused` (variables that could not be applied). Keys and values are checked section
    by section; the checks across sections (workers, TLS, quotas, the default lease) need
    every section valid, and run once it is."""
    mistakes: list[Mistake] = []
    settings: Settings | None = None
    store: StoreSettings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        mistakes.extend(_mistakes(exc))
        mistakes.extend(_number_mistakes_of_valid_sections(raw, exc))
    else:
        mistakes.extend(_number_mistakes(settings))
    store_model = _store_model(raw, settings)
    if store_model is not None:
        try:
            store = store_model.model_validate(raw.get("store", {}))
        except ValidationError as exc:
            mistakes.extend(_mistakes(exc, prefix="store"))
        else:
            mistakes.extend(_number_mistakes(store, "store"))
    if settings is not None and store is not None:
        mistakes.extend(_cross_section_mistakes(settings, store.ttl))
    # A variable refused for its section (`server: must be a mapping ...`) is that
    # section's mistake: validation need not name the section again.
    named = {path for path, _ in refused}
    mistakes = [*refused, *(mistake for mistake in mistakes if mistake[0] not in named)]
    if mistakes:
        (path, reason), *more = mistakes
        raise ConfigError(path, reason, more=more)
    assert settings is not None
    return settings


def _store_model(raw: dict[str, Any], settings: Settings | None) -> type[StoreSettings] | None:
    """The model of the `store:` section, when the backend is known and the section is a
    mapping (or absent); else None, and the mistake is named by `Settings`."""
    if not isinstance(raw.get("store", {}), dict):
        return None
    if settings is not None:
        backend = settings.backend.type
    else:
        try:  # the backend is read alone: a mistake elsewhere hides no store key
            backend = BackendSettings.model_validate(raw.get("backend", {})).type
        except ValidationError:
            return None
    return store_class(backend).settings_model


def _cross_section_mistakes(settings: Settings, default_ttl: float) -> list[Mistake]:
    mistakes: list[Mistake] = []
    if settings.server.workers > 1:
        if settings.backend.type == "memory":
            mistakes.append(
                (
                    "server.workers",
                    "the memory store keeps its locks inside one process, so it can have only"
                    " 1 worker; use a shared backend (redis, scylladb, dynamodb) for more",
                )
            )
        elif split_address(settings.serverAddress)[1] == 0:
            mistakes.append(
                ("server.workers", "several workers need a fixed port in serverAddress")
            )
        if settings.observability.prometheusPort:
            mistakes.append(
                (
                    "observability.prometheusPort",
                    "cannot be used with server.workers > 1 (each worker would need its own"
                    " port); push metrics over OTLP instead",
                )
            )
    mistakes.extend(_security_mistakes(settings))
    if default_ttl > settings.server.maxTtl:
        mistakes.append(
            (
                "store.ttl",
                f"the default lease ({default_ttl} s) is above "
                f"server.maxTtl ({settings.server.maxTtl:g} s)",
            )
        )
    return mistakes


def _security_mistakes(settings: Settings) -> list[Mistake]:
    """Keys of `server.tls` and `auth` that only make sense together. (What the files they
    name hold is checked by the server, which reads them: `quorum_quest.server.tls`.)"""
    mistakes: list[Mistake] = []
    tls = settings.server.tls
    if tls.keyFile and not tls.certFile:
        mistakes.append(("server.tls.certFile", "is needed with server.tls.keyFile"))
    if tls.certFile and not tls.keyFile:
        mistakes.append(("server.tls.keyFile", "is needed with server.tls.certFile"))
    if tls.clientCaFile and not tls.certFile:
        mistakes.append(
            (
                "server.tls.clientCaFile",
                "needs server.tls.certFile and keyFile: client certificates are checked over TLS",
            )
        )
    quotas = settings.auth.quotas
    if quotas.any and not settings.auth_on:
        key = "maxLeasesPerIdentity" if quotas.maxLeasesPerIdentity else "callsPerSecondPerIdentity"
        mistakes.append(
            (
                f"auth.quotas.{key}",
                "quotas are per identity and need auth on (auth.tokensFile, auth.rules or"
                " server.tls.clientCaFile); without it every caller would share one quota",
            )
        )
    return mistakes


def _number_mistakes_of_valid_sections(raw: dict[str, Any], exc: ValidationError) -> list[Mistake]:
    """The numbers out of range in each section that is valid on its own, when another
    one is not (and `Settings` could not be built)."""
    failed = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
    mistakes: list[Mistake] = []
    for name, field in Settings.model_fields.items():
        model = field.annotation
        if name in failed or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        try:
            section = model.model_validate(raw.get(name, {}))
        except ValidationError:
            continue
        mistakes.extend(_number_mistakes(section, name))
    return mistakes


def _number_mistakes(model: BaseModel, prefix: str = "") -> list[Mistake]:
    """inf, nan and numbers too large for the clocks and integers they become."""
    mistakes: list[Mistake] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            mistakes.extend(_number_mistakes(value, path))
        elif isinstance(value, float) and not math.isfinite(value):
            mistakes.append((path, f"must be a finite number, not {value}"))
        elif isinstance(value, float) and abs(value) > MAX_SECONDS:
            mistakes.append(
                (path, f"must be at most {MAX_SECONDS} (about 31 years), not {value:g}")
            )
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            mistakes.append((path, f"must be at most {MAX_INTEGER}"))
    return mistakes


def _mistakes(exc: ValidationError, prefix: str = "") -> list[Mistake]:
    return [_mistake(error, prefix) for error in exc.errors(include_url=False)]


def _mistake(error: Any, prefix: str) -> Mistake:
    path = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    reason = _one_line(error["msg"].removeprefix("Value error, "))
    if error["type"] == "extra_forbidden":
        reason = "unknown key"
    elif error["type"] in _BOUND_ERRORS and not _finite(error.get("input")):
        reason = f"must be a finite number, not {error['input']}"
    return path, reason


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return True


def _one_line(text: object) -> str:
    return " ".join(str(text).splitlines())


def _describe(exc: BaseException) -> str:
    return _one_line(f"{type(exc).__name__}: {exc}")[:300]


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def _match(name: str, candidates: Any) -> str | None:
    by_squashed = {_squash(candidate): candidate for candidate in candidates}
    return by_squashed.get(_squash(name))


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> list[Mistake]:
    """Layer `QUORUMQUEST_*` variables onto `raw` (in place), matching names loosely, and
    return the mistakes of those that could not be applied (the others are). The client's
    variables (`CLIENT_VARIABLES`) are no keys of the service and are skipped."""
    overrides = {
        name[len(ENV_PREFIX) :]: value
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX) and name not in CLIENT_VARIABLES
    }
    refused: list[Mistake] = []
    # The backend decides which store keys exist, so it is settled first.
    for name in sorted(overrides, key=lambda n: _squash(n) != "backendtype"):
        try:
            _apply_one(raw, name, overrides[name])
        except ConfigError as exc:
            refused.extend(exc.mistakes)
    return refused


def _apply_one(raw: dict[str, Any], name: str, value: str) -> None:
    variable = ENV_PREFIX + name
    fields = Settings.model_fields
    top = _match(name, fields)
    if top is not None and not _is_section(top):
        raw[top] = _parse(value, fields[top], variable)
        return
    section_name, _, key = name.partition("_")
    section = _match(section_name, fields)
    if section is None or not key:
        raise ConfigError(variable, "environment variable names no known key")
    if section == "store":
        _set_key(raw, [section], key, value, _store_keys(raw), variable)
        return
    model = fields[section].annotation
    path = [section]
    # A key of a nested section (`QUORUMQUEST_SERVER_TLS_CERTFILE` = server.tls.certFile):
    # where the name is no key of the section, its head may name a section inside it.
    while _match(key, model.model_fields) is None:
        head, _, rest = key.partition("_")
        inner = _match(head, model.model_fields)
        annotation = model.model_fields[inner].annotation if inner else None
        if not rest or not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        path.append(inner)
        model, key = annotation, rest
    _set_key(raw, path, key, value, model.model_fields, variable)


def _set_key(
    raw: dict[str, Any],
    path: list[str],
    key: str,
    value: str,
    known: dict[str, FieldInfo],
    variable: str,
) -> None:
    """Set `key` (matched loosely against `known`) in the section at `path` of `raw`."""
    target = raw
    for depth, name in enumerate(path):
        if name not in target:
            target[name] = {}
        target = target[name]
        if not isinstance(target, dict):
            raise ConfigError(
                ".".join(path[: depth + 1]),
                f"must be a mapping of keys, not {_kind(target)} ({variable} sets one of them)",
            )
    matched = _match(key, [*target, *known]) or key.lower()
    for existing in [k for k in target if _squash(k) == _squash(matched)]:
        del target[existing]
    target[matched] = _parse(value, known.get(matched), variable)


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {
        list: "a list",
        str: "text",
        int: "a number",
        float: "a number",
        bool: "true/false",
    }.get(type(value), type(value).__name__)


def _is_section(field: str) -> bool:
    annotation = Settings.model_fields[field].annotation
    return field == "store" or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def _store_keys(raw: dict[str, Any]) -> dict[str, FieldInfo]:
    backend = raw.get("backend")
    name = backend.get("type", "memory") if isinstance(backend, dict) else "memory"
    try:
        model = store_class(canonical_name(str(name))).settings_model
    except UnknownBackend:
        return {}  # reported by the validation of backend.type
    return model.model_fields


# `[::1]:9042,[::2]:9042`: a comma-separated list of addresses, not broken JSON.
_ADDRESS_LIST = re.compile(
    r"\s*(\[[\w:.%-]+\](:\d+)?|[^\s\[\]{},]+)\s*(,\s*(\[[\w:.%-]+\](:\d+)?|[^\s\[\]{},]+)\s*)*"
)


def _parse(value: str, field: FieldInfo | None, variable: str) -> Any:
    """A variable's value for `field`. A text key takes it as it is; for any other key
    a value in brackets or braces is JSON (`["a:1", "b:2"]`), and broken JSON is an
    error rather than a host name. Anything else stays text for validation to read."""
    if field is not None and _takes_text(field.annotation):
        return value
    if not value.lstrip().startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        if field is None or _ADDRESS_LIST.fullmatch(value):
            return value  # an unknown key (reported by validation) or bracketed IPv6 addresses
        reason = _one_line(exc) if isinstance(exc, ValueError) else "it nests too deeply"
        raise ConfigError(
            variable, f'is not valid JSON ({reason}); write a list as ["a:9042", "b:9042"]'
        ) from None


def _takes_text(annotation: Any) -> bool:
    """Whether a key of this type is text (`str`, a secret, a choice of words)."""
    if annotation in (str, SecretStr):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(choice, str) for choice in get_args(annotation))
    if origin in (Union, types.UnionType):
        options = [option for option in get_args(annotation) if option is not type(None)]
        return bool(options) and all(map(_takes_text, options))
    return False
