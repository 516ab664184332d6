"""Who is calling: one identity per call, from a bearer token or a client certificate.

What this module guarantees:

- a call that sends `authorization: Bearer <token>` is the identity the tokens file maps
  that token to; a token the file does not hold (or any other `authorization` value) is
  refused as UNAUTHENTICATED, never taken for "no credentials";
- otherwise, over mTLS, the call is its client certificate's identity: the subject's
  common name (CN), or for a certificate without one its first subject alternative name
  (as grpc lists them: DNS, URI, e-mail, IP); the client CA vouched for it in the
  handshake;
- otherwise the call is `anonymous`, which only a rule naming `anonymous` lets do anything;
- an identity is 1 to 256 bytes of UTF-8 without control characters (a certificate with
  another is refused, a tokens file holding one is not loaded), and is never `anonymous`;
- tokens are kept only as SHA-256 digests, looked up by the digest of what the caller
  sent and then compared in constant time; no log line or status holds a token.

The tokens file is YAML, `identity: token` per line, each token in plain text or as
`sha256:<64 hex digits>` (what `printf %s "$TOKEN" | sha256sum` prints). `Tokens.poll()`
re-reads it when it changes; a file that cannot be used then is refused with an ERROR
line and the tokens in force stay.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

import grpc
import yaml
from loguru import logger

from quorum_quest.config.settings import ANONYMOUS
from quorum_quest.errors import ConfigError, Unauthenticated
from quorum_quest.stores.base import MAX_NAME_BYTES

TOKENS_KEY = "auth.tokensFile"
DIGEST_PREFIX = "sha256:"
# What no name may contain: C0 controls, DEL, C1 controls, line and paragraph separators.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# grpc's auth-context properties that name a certificate, in the order they are tried.
CERTIFICATE_NAMES = ("x509_common_name", "x509_subject_alternative_name")
_HEX = re.compile(r"[0-9a-fA-F]{64}")


def identity_problem(identity: str) -> str | None:
    """Why `identity` cannot be one, or None when it can."""
    if not identity or identity.isspace():
        return "is empty"
    if len(identity.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if CONTROL_CHARACTER.search(identity):
        return "holds a control character"
    if identity == ANONYMOUS:
        return f"is {ANONYMOUS!r}, the identity of callers without credentials"
    return None


class TokenBook:
    """The tokens of one version of the tokens file: SHA-256 digest -> identity."""

    def __init__(self, identities: dict[bytes, str]) -> None:
        self._identities = {digest: (digest, identity) for digest, identity in identities.items()}

    def __len__(self) -> int:
        return len(self._identities)

    def identity(self, token: str) -> str | None:
        """The identity `token` belongs to, or None.

        What is looked up is the digest of what the caller sent, never the token; and
        bytes hash with a per-process secret key, so the lookup's timing tells nothing
        about the stored digests. The match is then confirmed in constant time.
        """
        digest = hashlib.sha256(token.encode()).digest()
        found = self._identities.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    @classmethod
    def load(cls, path: str, *, warn: bool = True) -> TokenBook:
        """Read and check the file; every failure is a `ConfigError` naming the key and
        what is wrong, never the file's text. With `warn`, tokens kept in plain text are
        logged (as a count)."""
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise ConfigError(
                TOKENS_KEY, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            document = yaml.safe_load(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(TOKENS_KEY, f"{path} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            # Only where: PyYAML's own message may quote the file, which holds secrets.
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(TOKENS_KEY, f"{path} is not valid YAML{at}") from None
        except Exception:  # a value PyYAML cannot build: still one line, no content
            raise ConfigError(TOKENS_KEY, f"{path} cannot be read as YAML") from None
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(TOKENS_KEY, f"{path} must hold a mapping of identity: token")
        identities: dict[bytes, str] = {}
        plain = 0
        for identity, token in document.items():
            digest, was_plain = _digest(path, identity, token)
            plain += was_plain
            if digest in identities:
                raise ConfigError(
                    TOKENS_KEY,
                    f"{path}: identities {identities[digest]!r} and {identity!r} have the same"
                    " token; a token must name one identity",
                )
            identities[digest] = identity
        if plain and warn:
            logger.warning(
                "{} holds {} token{} in plain text; store sha256:<hex> digests instead"
                " (docs/security.md)",
                path,
                plain,
                "s" if plain > 1 else "",
            )
        return cls(identities)


def _digest(path: str, identity: Any, token: Any) -> tuple[bytes, bool]:
    """The token's SHA-256 digest, and whether it was given in plain text."""
    if not isinstance(identity, str):
        raise ConfigError(TOKENS_KEY, f"{path}: identity {identity!r} must be text (quote it)")
    if problem := identity_problem(identity):
        raise ConfigError(TOKENS_KEY, f"{path}: identity {identity!r} {problem}")
    if not isinstance(token, str) or not token:
        raise ConfigError(
            TOKENS_KEY, f"{path}: the token of identity {identity!r} must be non-empty text"
        )
    if token.startswith(DIGEST_PREFIX):
        digest = token[len(DIGEST_PREFIX) :]
        if not _HEX.fullmatch(digest):
            raise ConfigError(
                TOKENS_KEY,
                f"{path}: the token of identity {identity!r} is not sha256: and 64 hex digits",
            )
        return bytes.fromhex(digest), False
    if token != token.strip() or any(char.isspace() or not char.isprintable() for char in token):
        raise ConfigError(
            TOKENS_KEY,
            f"{path}: the token of identity {identity!r} holds spaces or control characters,"
            " which no authorization header can carry",
        )
    return hashlib.sha256(token.encode()).digest(), True


class Tokens:
    """The tokens in force: the file's last good version, re-read when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._loaded = _signature(path)
        self.book = TokenBook.load(path)
        self._seen = self._loaded
        self._rejected: tuple[int, int, int, int] | None = None

    def poll(self) -> bool:
        """Take the file's new content once it changed and settled; True if taken."""
        signature = _signature(self.path)
        settled = signature == self._seen
        self._seen = signature
        if not settled or signature in (self._loaded, self._rejected):
            return False
        try:
            book = TokenBook.load(self.path)
        except ConfigError as exc:
            self._rejected = signature
            logger.error(
                "tokens file change rejected, the {} tokens in force stay: {}", len(self.book), exc
            )
            return False
        self._loaded, self._rejected = signature, None
        self.book = book
        logger.info("tokens reloaded from {}: {} identities", self.path, len(book))
        return True


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata; None without
    one. Any other `authorization` value is `Unauthenticated`."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            return token
    return None


def certificate_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The identity of the call's client certificate (CN, else the first SAN); None
    when the call came without one."""
    properties = context.auth_context()
    for name in CERTIFICATE_NAMES:
        # A certificate without a CN has an empty one here.
        value = next((value for value in properties.get(name, ()) if value), None)
        if value is not None:
            try:
                identity = value.decode()
            except UnicodeDecodeError:
                raise Unauthenticated("the client certificate's name is not UTF-8") from None
            if problem := identity_problem(identity):
                raise Unauthenticated(f"the client certificate's name {problem}")
            return identity
    return None
