"""What `RedisPipe`, the store's pipelined script executor, promises, on a real Redis."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quorum_quest.stores._redis_pipe import RedisPipe
from quorum_quest.stores.redis import _ACQUIRE, _KEEP_ALIVE, _RELEASE
from tests.backends import free_port
from tests.backends.redis import RedisProcess

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None  # type: ignore[assignment]

pytestmark = pytest.mark.redis

# KEYS[1] and ARGV[1] back, with a nested table and an integer: every reply type the
# store's scripts use.
ECHO = "return {KEYS[1], ARGV[1], tonumber(ARGV[2]), {tonumber(ARGV[2]) * 2, 'x'}}"
FAIL = "return redis.error_reply('boom ' .. ARGV[1])"
# Holds Redis for ARGV[1] ms: a command in flight for as long as a test needs.
BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
repeat
  t = redis.call('TIME')
until tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - start >= tonumber(ARGV[1])
return 1
"""


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def answered_once_recovered(command: Callable[[], Awaitable[T]], within: float = 30) -> T:
    """`command`'s reply, asked again after each timeout: a loaded machine may need longer
    than a test's short timeout to reconnect after an outage."""
    give_up = time.monotonic() + within
    while True:
        try:
            return await command()
        except RedisTimeoutError:
            if time.monotonic() > give_up:
                raise


async def connected_clients(pipe: RedisPipe) -> int:
    return len((await pipe.execute("CLIENT", "LIST")).splitlines())


async def test_replies_map_to_their_commands_under_200_concurrent(
    redis_url: str, prefix: str
) -> None:
    pipe = RedisPipe.from_url(redis_url)
    echo, fail = pipe.register(ECHO), pipe.register(FAIL)
    try:

        async def one(n: int) -> object:
            if n % 10 == 3:
                with pytest.raises(ResponseError, match=f"boom {n}$"):
                    await pipe.evalsha(fail, [], [n])
                return "failed"
            if n % 10 == 7:
                return await pipe.execute("ECHO", f"plain {n}")
            return await pipe.evalsha(echo, [f"{prefix}:{n}"], [f"v{n}", n])

        replies = await asyncio.gather(*(one(n) for n in range(200)))
    finally:
        await pipe.close()
    for n, reply in enumerate(replies):
        if n % 10 == 3:
            assert reply == "failed"
        elif n % 10 == 7:
            assert reply == f"plain {n}".encode()
        else:
            assert reply == [f"{prefix}:{n}".encode(), f"v{n}".encode(), n, [2 * n, b"x"]]


async def test_replies_equal_redis_py_replies(redis_url: str, prefix: str) -> None:
    """The store's own scripts answer the same values through either client."""
    pipe = RedisPipe.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    lock, marker = f"{prefix}:{{svc:dom}}", f"{prefix}:state"
    acquire, keep_alive, release = (
        pipe.register(s.source) for s in (_ACQUIRE, _KEEP_ALIVE, _RELEASE)
    )
    try:
        granted = await pipe.evalsha(acquire, [lock, f"{lock}:token", marker], ["a", 5000, 0])
        assert granted == [1, granted[1], b"a", 5000, 1, b"missing"]
        keys, args = [lock, f"{lock}:token", marker], ["b", 5000, 0]
        by_pipe = await pipe.evalsha(acquire, keys, args)
        by_redis_py = await client.evalsha(acquire, 3, *keys, *args)
        del by_pipe[3], by_redis_py[3]  # the lease's PTTL
        assert by_pipe == by_redis_py == [0, granted[1], b"a", 0, b""]
        keys, args = [lock, marker], ["a", 5000, 0]
        assert await pipe.evalsha(keep_alive, keys, args) == [granted[1], 0, b""]
        assert await client.evalsha(keep_alive, 2, *keys, *args) == [granted[1], 0, b""]
        keys, published = [lock, f"{lock}:waiting"], [f"{prefix}:released", "svc:dom"]
        assert await pipe.evalsha(release, keys, ["a", str(granted[1]), *published]) == 1
        assert await client.evalsha(release, 2, *keys, "a", "0", *published) == 0
    finally:
        await pipe.close()
        await client.aclose()


async def test_error_replies_raise_and_the_connection_stays(redis_url: str) -> None:
    pipe = RedisPipe.from_url(redis_url)
    try:
        connection_id = await pipe.execute("CLIENT", "ID")
        with pytest.raises(ResponseError, match="boom x"):
            await pipe.evalsha(pipe.register(FAIL), [], ["x"])
        with pytest.raises(ResponseError, match="unknown command"):
            await pipe.execute("NO-SUCH-COMMAND")
        with pytest.raises(ResponseError, match="NOSCRIPT"):
            await pipe.evalsha("0" * 40, [], [])  # not registered: nothing to load
        assert await pipe.execute("CLIENT", "ID") == connection_id
    finally:
        await pipe.close()


async def test_noscript_after_script_flush_loads_and_retries(redis_url: str, prefix: str) -> None:
    pipe = RedisPipe.from_url(redis_url)
    echo = pipe.register(ECHO)
    try:
        assert (await pipe.evalsha(echo, ["k"], ["v", 1]))[2] == 1
        await pipe.execute("SCRIPT", "FLUSH")
        replies = await asyncio.gather(*(pipe.evalsha(echo, ["k"], ["v", n]) for n in range(50)))
        assert [reply[2] for reply in replies] == list(range(50))
        await pipe.execute("SCRIPT", "FLUSH")
        batch = await pipe.evalsha_many(echo, [[f"{prefix}:{n}"] for n in range(50)], ["v", 4])
        assert [reply[0] for reply in batch] == [f"{prefix}:{n}".encode() for n in range(50)]
        assert await pipe.execute("SCRIPT", "EXISTS", echo) == [1]
    finally:
        await pipe.close()


async def test_evalsha_many_runs_every_script_then_raises_the_first_error(
    redis_url: str, prefix: str
) -> None:
    pipe = RedisPipe.from_url(redis_url)
    counter = pipe.register("return redis.call('INCR', KEYS[1])")
    try:
        assert await pipe.evalsha_many(counter, [], []) == []
        keys = [[f"{prefix}:a"], [f"{prefix}:a"], [f"{prefix}:b"]]
        assert await pipe.evalsha_many(counter, keys, []) == [1, 2, 1]
        await pipe.execute("SET", f"{prefix}:text", "not a number")
        with pytest.raises(ResponseError, match="not an integer"):
            await pipe.evalsha_many(counter, [[f"{prefix}:text"], [f"{prefix}:b"]], [])
        assert await pipe.execute("GET", f"{prefix}:b") == b"2"
    finally:
        await pipe.close()


async def test_killed_redis_fails_in_flight_commands_promptly_then_reconnects() -> None:
    with RedisProcess() as server:
        pipe = RedisPipe.from_url(server.url, timeout=30.0)  # failures here are not timeouts
        echo, busy = pipe.register(ECHO), pipe.register(BUSY)
        try:
            assert await pipe.evalsha(busy, [], [0]) == 1  # loaded: the next ones go at once
            assert (await pipe.evalsha(echo, ["k"], ["v", 1]))[2] == 1
            in_flight = [asyncio.ensure_future(pipe.evalsha(busy, [], [5000]))]
            in_flight += [
                asyncio.ensure_future(pipe.evalsha(echo, ["k"], ["v", n])) for n in range(20)
            ]
            await asyncio.sleep(0.2)  # sent, and Redis is inside the busy script
            started = time.monotonic()
            server.stop()
            results = await asyncio.gather(*in_flight, return_exceptions=True)
            assert time.monotonic() - started < 2.0
            assert all(isinstance(result, RedisConnectionError) for result in results), results

            with pytest.raises(RedisConnectionError, match="cannot connect"):
                await pipe.execute("PING")  # down: refused at once

            server.start()  # the same port, an empty server without the scripts
            replies = await asyncio.gather(
                *(pipe.evalsha(echo, ["k"], ["v", n]) for n in range(200))
            )
            assert [reply[2] for reply in replies] == list(range(200))
            assert await connected_clients(pipe) == 1  # one shared connection, one attempt
        finally:
            await pipe.close()


async def test_commands_time_out_while_redis_is_paused_then_recover() -> None:
    timeout = 1.0
    with RedisProcess() as server:
        pipe = RedisPipe.from_url(server.url, timeout=timeout)
        echo = pipe.register(ECHO)
        try:
            assert await pipe.execute("PING") == b"PONG"
            server.pause()
            try:
                started = time.monotonic()
                results = await asyncio.gather(
                    *(pipe.evalsha(echo, ["k"], ["v", n]) for n in range(50)),
                    return_exceptions=True,
                )
                elapsed = time.monotonic() - started
                assert all(isinstance(result, RedisTimeoutError) for result in results), results
                # Together: one after another, 50 timeouts would take 50 s.
                assert 0.9 * timeout <= elapsed < 10 * timeout, elapsed
            finally:
                server.resume()
            reply = await answered_once_recovered(lambda: pipe.evalsha(echo, ["k"], ["v", 7]))
            assert reply[2] == 7
        finally:
            await pipe.close()


LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(
        uvloop and uvloop.new_event_loop,
        id="uvloop",
        marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed"),
    ),
]


@pytest.mark.parametrize("new_loop", LOOPS)
def test_a_reply_that_arrived_while_the_event_loop_stalled_is_not_overdue(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """An I/O callback blocks the loop well past the command's timeout, right after the
    command went out, while its reply arrives. libuv (uvloop) runs due timers before it
    polls for I/O again, so the deadline is looked at before the reply is read.

    Redis is paused until the stall has begun, so the reply cannot already be in the
    poll that starts the stall. The timeout is generous so that a loaded machine never
    makes the commands around the stall late; the stall itself outlasts it."""
    timeout = 2.0
    key = "stalled"

    def stall_until_answered_and_past_the_deadline(server: RedisProcess) -> None:
        """Blocks: lets Redis run the command, waits until it has (so its reply is
        written, see below), then longer than the timeout."""
        witness = redis.Redis.from_url(server.url)
        try:
            server.resume()
            give_up = time.monotonic() + 30
            while witness.get(key) != b"1":
                assert time.monotonic() < give_up, "the command was never sent"
                time.sleep(0.01)
            # Redis writes a reply before it reads the next command of another client:
            # once this PING is answered, the INCR's reply is in the pipe's socket.
            witness.ping()
            time.sleep(timeout + 0.5)
        finally:
            witness.close()

    async def stalled_command(server: RedisProcess) -> None:
        loop = asyncio.get_running_loop()
        pipe = RedisPipe.from_url(server.url, timeout=timeout)
        wake, trigger = socket.socketpair()
        wake.setblocking(False)

        def on_readable() -> None:
            loop.remove_reader(wake)
            wake.recv(1)
            stall_until_answered_and_past_the_deadline(server)

        try:
            connection_id = await pipe.execute("CLIENT", "ID")
            loop.add_reader(wake, on_readable)
            server.pause()
            command = asyncio.ensure_future(pipe.execute("INCR", key))
            for _ in range(5):
                await asyncio.sleep(0)  # the INCR is written
            trigger.send(b"!")  # the stall runs as an I/O callback, at the next poll
            assert await command == 1
            assert await pipe.execute("CLIENT", "ID") == connection_id  # never dropped
        finally:
            server.resume()
            loop.remove_reader(wake)
            wake.close()
            trigger.close()
            await pipe.close()

    with RedisProcess() as server, asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(stalled_command(server))


async def test_a_cancelled_caller_does_not_shift_the_replies() -> None:
    with RedisProcess() as server:
        pipe = RedisPipe.from_url(server.url)
        try:
            assert await pipe.execute("PING") == b"PONG"
            server.pause()
            try:
                first = asyncio.ensure_future(pipe.execute("ECHO", "first"))
                second = asyncio.ensure_future(pipe.execute("ECHO", "second"))
                await asyncio.sleep(0.05)
                first.cancel()
            finally:
                server.resume()
            assert await second == b"second"
            assert await pipe.execute("ECHO", "third") == b"third"
        finally:
            await pipe.close()


async def test_close_fails_pending_commands_and_later_ones() -> None:
    with RedisProcess() as server:
        pipe = RedisPipe.from_url(server.url, timeout=30.0)
        assert await pipe.execute("PING") == b"PONG"
        server.pause()
        try:
            pending = [asyncio.ensure_future(pipe.execute("ECHO", str(n))) for n in range(10)]
            await asyncio.sleep(0.05)
            await pipe.close()
            results = await asyncio.gather(*pending, return_exceptions=True)
        finally:
            server.resume()
        assert all(isinstance(result, RedisConnectionError) for result in results), results
        with pytest.raises(RedisConnectionError, match="closed"):
            await pipe.execute("PING")


async def test_close_during_connect_fails_the_waiting_callers() -> None:
    with RedisProcess() as server:
        server.pause()  # the kernel accepts the connection; AUTH is never answered
        try:
            pipe = RedisPipe(port=server.port, password="x", timeout=30.0)
            waiting = asyncio.ensure_future(pipe.execute("PING"))
            await asyncio.sleep(0.1)
            await pipe.close()
            with pytest.raises(RedisConnectionError, match="closed"):
                await waiting
        finally:
            server.resume()


async def test_password_and_db_are_used_on_connect(prefix: str) -> None:
    with RedisProcess("--requirepass", "s3cret") as server:
        wrong = RedisPipe(host="127.0.0.1", port=server.port, password="nope")
        try:
            with pytest.raises(RedisConnectionError, match="WRONGPASS"):
                await wrong.execute("PING")
        finally:
            await wrong.close()
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        pipe = RedisPipe.from_url(url)
        try:
            await pipe.execute("SET", f"{prefix}:k", "v")
        finally:
            await pipe.close()
        client = aioredis.Redis(port=server.port, password="s3cret", db=3)
        try:
            assert await client.get(f"{prefix}:k") == b"v"
        finally:
            await client.aclose()


async def test_unix_socket_url(tmp_path: Path, prefix: str) -> None:
    socket_path = tmp_path / "redis.sock"
    with RedisProcess("--unixsocket", str(socket_path), "--unixsocketperm", "700"):
        pipe = RedisPipe.from_url(f"unix://{socket_path}?db=2")
        try:
            assert await pipe.evalsha(pipe.register(ECHO), [prefix], ["v", 3]) == [
                prefix.encode(),
                b"v",
                3,
                [6, b"x"],
            ]
            assert (await pipe.execute("CLIENT", "INFO")).count(b"db=2") == 1
        finally:
            await pipe.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls(tmp_path: Path) -> None:
    cert_file, key_file = self_signed(tmp_path)
    tls_port = free_port()
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert_file)]
    tls += ["--tls-key-file", str(key_file), "--tls-ca-cert-file", str(cert_file)]
    with RedisProcess(*tls, "--tls-auth-clients", "no"):
        url = f"rediss://127.0.0.1:{tls_port}/0"
        unverified = RedisPipe.from_url(url)  # the system's CAs do not know this one
        try:
            with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await unverified.execute("PING")
        finally:
            await unverified.close()
        pipe = RedisPipe.from_url(url, ssl=ssl.create_default_context(cafile=cert_file))
        try:
            assert (await pipe.evalsha(pipe.register(ECHO), ["k"], ["v", 5]))[2] == 5
        finally:
            await pipe.close()


def test_from_url_refuses_options_it_does_not_apply() -> None:
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisPipe.from_url("redis://127.0.0.1:6379/0?socket_timeout=3")
    pipe = RedisPipe.from_url("redis://user:pw@example.com:7000/4", password="other")
    assert pipe.where == "example.com:7000/4"
