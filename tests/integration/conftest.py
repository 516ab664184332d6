"""Fixtures shared by the integration tests: certificates made at test time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pki import Authority, Issued


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    """A certificate authority of the test's own."""
    return Authority(tmp_path)


@pytest.fixture
def server_cert(ca: Authority) -> Issued:
    """A server certificate for localhost and the loopback addresses, signed by `ca`."""
    return ca.issue("server", server=True)
