"""The fault proxy's modes, against a plain echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import Proxy

pytestmark = pytest.mark.faults


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EchoServer = self.server  # type: ignore[assignment]
        while data := self.request.recv(4096):
            server.received.append(data)
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[bytes] = []


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[Proxy]:
    with Proxy(echo.server_address[1]) as running:
        yield running


def connect(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def round_trip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


def test_passes_bytes_both_ways_on_loopback_only(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"ping") == b"ping"
        assert sock.getpeername()[0] == "127.0.0.1"


def test_added_latency_delays_each_direction(proxy: Proxy) -> None:
    proxy.pass_through(delay=0.1)
    with connect(proxy) as sock:
        started = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.2


def test_blackhole_holds_everything_and_delivers_it_on_heal(proxy: Proxy, echo: EchoServer) -> None:
    with connect(proxy) as old:
        assert round_trip(old, b"before") == b"before"
        proxy.blackhole()
        old.settimeout(0.3)
        new = connect(proxy)  # accepted, but not connected onwards
        new.settimeout(0.3)
        gone = connect(proxy)
        old.sendall(b"held")
        new.sendall(b"new")
        gone.sendall(b"late")
        gone.close()  # a client that gave up: what it sent still arrives later
        for sock in (old, new):
            with pytest.raises(TimeoutError):
                sock.recv(4096)
        assert echo.received == [b"before"]
        proxy.heal()
        old.settimeout(2)
        new.settimeout(2)
        assert old.recv(4096) == b"held"
        assert new.recv(4096) == b"new"
        new.close()
    deadline = time.monotonic() + 2
    while b"late" not in echo.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b"late" in echo.received


def test_reset_tears_connections_down(proxy: Proxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"ping") == b"ping"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            round_trip(sock, b"x")
    with pytest.raises(ConnectionResetError), connect(proxy) as sock:  # or at connect
        round_trip(sock, b"x")
    proxy.heal()
    with connect(proxy) as sock:
        assert round_trip(sock, b"back") == b"back"
