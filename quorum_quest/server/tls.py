"""TLS on the gRPC port: the certificate it presents, and the client CA of mTLS.

What this module guarantees:

- the service never starts on material it cannot serve: a path that cannot be read, a
  file that holds no PEM certificate or key, a key that does not belong to the
  certificate, an encrypted key, a certificate that has expired, a client CA file with no
  certificate that is still valid — each is a `ConfigError` naming the key
  (`server.tls.certFile`, `keyFile`, `clientCaFile`), and the service exits 2;
- rotation without restart: `ServerCertificates.poll()` notices when any of the files
  changes (content, or a symlink swapped as Kubernetes does with a Secret), and once they
  have stayed the same for one more poll (a pair written one file at a time is not taken
  halfway) checks the new material as at start. Valid, it is served to every connection
  made from then on (connections already open keep theirs); invalid, one ERROR line says
  why and the previous material stays in use;
- no message holds key material: errors name the key, the file and what is wrong.

grpc calls the fetcher (`_fetch`) before every TLS handshake, from its own thread; it
only hands over material that `poll()` (called by the server every second or so) has
already read and checked, so a handshake never waits on the file system.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from loguru import logger

from quorum_quest.config.settings import TlsSettings
from quorum_quest.errors import ConfigError

# A certificate that expires sooner than this is served with a WARNING.
EXPIRY_WARNING = datetime.timedelta(days=7)

# (st_dev, st_ino, st_size, st_mtime_ns) of each file, or None where it cannot be read.
Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True, slots=True)
class CertificateMaterial:
    """A checked certificate chain, its key and the client CA (None without mTLS)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    subject: str
    not_after: datetime.datetime

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.certificate_chain)], root_certificates=self.client_ca
        )


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(
            key, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None


def _certificates(key: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(key, f"{path} holds no PEM certificate that can be read") from None


def load_certificates(
    tls: TlsSettings, *, now: datetime.datetime | None = None
) -> CertificateMaterial:
    """Read and check the files `tls` names (see the module's guarantees)."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain_pem = _read("server.tls.certFile", tls.certFile)
    key_pem = _read("server.tls.keyFile", tls.keyFile)
    chain = _certificates("server.tls.certFile", tls.certFile, chain_pem)
    leaf = chain[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            "server.tls.keyFile",
            f"{tls.keyFile} holds an encrypted key: give it unencrypted and protect the file",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            "server.tls.keyFile", f"{tls.keyFile} holds no PEM private key that can be read"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise ConfigError(
            "server.tls.keyFile",
            f"{tls.keyFile} is not the key of the certificate in server.tls.certFile"
            f" ({tls.certFile})",
        )
    if leaf.not_valid_after_utc <= now:
        raise ConfigError(
            "server.tls.certFile",
            f"the certificate in {tls.certFile} expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
        )
    client_ca = None
    if tls.clientCaFile:
        client_ca = _read("server.tls.clientCaFile", tls.clientCaFile)
        authorities = _certificates("server.tls.clientCaFile", tls.clientCaFile, client_ca)
        if all(ca.not_valid_after_utc <= now for ca in authorities):
            raise ConfigError(
                "server.tls.clientCaFile",
                f"every certificate in {tls.clientCaFile} has expired: no client could connect",
            )
    return CertificateMaterial(
        certificate_chain=chain_pem,
        private_key=key_pem,
        client_ca=client_ca,
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
    )


def _signature(paths: tuple[str, ...]) -> Signature:
    signature = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            signature.append(None)
        else:
            signature.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


class ServerCertificates:
    """The certificate material the gRPC port serves, re-read when its files change."""

    def __init__(self, tls: TlsSettings) -> None:
        self.tls = tls
        self._paths = tuple(p for p in (tls.certFile, tls.keyFile, tls.clientCaFile) if p)
        self._loaded = _signature(self._paths)
        self.material = load_certificates(tls)
        self._seen = self._loaded  # the signature at the last poll
        self._rejected: Signature | None = None
        # What handshakes should use, and what grpc was last handed: each is replaced
        # whole (one assignment), so the fetcher needs no lock against `poll`.
        self._configuration = self.material.configuration()
        self._handed = self._configuration
        _warn_if_expiring(self.material)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port`: mTLS (a client certificate signed by the
        client CA required) when `clientCaFile` is set."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration,
            self._fetch,
            require_client_authentication=self.tls.mutual,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc asks before each handshake: new material to use, or None to keep it.
        (Two handshakes racing here may both hand the same new material over: harmless.)"""
        configuration = self._configuration
        if configuration is self._handed:
            return None
        self._handed = configuration
        return configuration

    def poll(self) -> bool:
        """Take the files' new content if they changed and have settled; True if taken."""
        signature = _signature(self._paths)
        settled = signature == self._seen
        self._seen = signature
        if not settled or signature == self._loaded or signature == self._rejected:
            return False
        try:
            material = load_certificates(self.tls)
        except ConfigError as exc:
            self._rejected = signature
            logger.error(
                "new TLS certificate rejected, still serving the previous one ({}): {}",
                self.material.subject,
                exc,
            )
            return False
        self._loaded, self._rejected = signature, None
        self.material = material
        self._configuration = material.configuration()
        logger.info(
            "TLS certificate reloaded: serving {} (valid until {:%Y-%m-%d %H:%M} UTC)"
            " to new connections",
            material.subject,
            material.not_after,
        )
        _warn_if_expiring(material)
        return True


def _warn_if_expiring(material: CertificateMaterial) -> None:
    left = material.not_after - datetime.datetime.now(datetime.UTC)
    if left < EXPIRY_WARNING:
        logger.warning(
            "the TLS certificate ({}) expires on {:%Y-%m-%d %H:%M} UTC, in {:.1f} days",
            material.subject,
            material.not_after,
            left.total_seconds() / 86400,
        )
