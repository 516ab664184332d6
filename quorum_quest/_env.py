"""Environment variables the client side reads (the SDK and the `quorum-quest` command).

They share the service's `QUORUMQUEST_` prefix and are often set in the same
environment as the service (a container, a shell), so the service's loader skips
exactly these names instead of refusing them as unknown keys. This module imports
nothing, so the SDK can use it without the service's dependencies.
"""

from __future__ import annotations

CLIENT_VARIABLES = (
    "QUORUMQUEST_ADDRESS",
    "QUORUMQUEST_TOKEN",
    "QUORUMQUEST_TOKEN_FILE",
    "QUORUMQUEST_TLS",
    "QUORUMQUEST_TLS_CA_FILE",
    "QUORUMQUEST_TLS_CERT_FILE",
    "QUORUMQUEST_TLS_KEY_FILE",
    "QUORUMQUEST_TLS_SERVER_NAME",
)
