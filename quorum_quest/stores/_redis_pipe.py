"""A lean, pipelined Redis client for the Redis store's hot path: EVALSHA of its scripts.

One long-lived connection (TCP, TLS or a unix socket; AUTH and SELECT on connect)
carries every command. A command is packed straight to RESP bytes and queued; all
commands queued in one event-loop tick go out in one write, and Redis answers them in
order, so replies (parsed by `hiredis.Reader`) are matched to their callers first in,
first out. Per command that is one `pack_command`, one future and a share of one
`write` and one `feed`: no pool checkout, no per-command parser or callback lookup.

Failure semantics:

- An error reply raises `ResponseError` (a `RedisError`) in its caller only; the
  connection stays up. A NOSCRIPT reply to a script registered here makes the
  executor `SCRIPT LOAD` it and send that one command once more.
- A socket error, EOF, protocol error, or a reply overdue by more than `timeout`
  seconds after its command was queued loses the connection: every command in flight
  on it fails at once with `ConnectionError` or `TimeoutError` (redis-py's, both
  `RedisError`s: whether such a command ran is unknown), and the socket is dropped.
  The next command connects again, so the executor survives a Redis restart.
- A reply is judged overdue only after the event loop has polled the socket once
  more past the deadline, with nothing read: after the loop stalled (a blocking
  call, a GC pause), a reply that arrived meanwhile is read, not counted late.
- Opening the socket is bounded by `timeout`, and so is each AUTH/SELECT reply after
  it; callers arriving meanwhile share that one attempt and its outcome.
- A caller that is cancelled leaves its command in flight (Redis may still run it);
  its reply is discarded and the replies after it still reach their own callers.
- `close()` fails every command in flight, closes the socket, and makes every later
  command fail with `ConnectionError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl as ssl_module
from collections import deque
from collections.abc import Sequence
from typing import Any

from hiredis import ProtocolError, Reader, pack_command
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float

# How long after finding its oldest command past the deadline a connection looks again
# before it gives up on it. Any delay > 0 puts that second look in a later turn of the
# event loop, after one more poll for I/O; 1 ms is the finest uvloop's timers take.
_OVERDUE_RECHECK_S = 0.001

# What a URL may carry besides its scheme; anything else (query options) is refused.
_URL_PARTS = frozenset({"host", "port", "db", "username", "password", "path"})


def _is_noscript(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")


class _Connection(asyncio.Protocol):
    """One socket: commands written in the order sent, replies matched to them FIFO.

    Once lost (socket error, EOF, protocol error, an overdue reply, or `close`) it has
    failed every command in flight and stays lost; `send` then fails at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, where: str) -> None:
        self._loop = loop
        self._timeout = timeout
        self._where = where
        self._reader = Reader(replyError=ResponseError)
        # (future, deadline) per command in flight, oldest first.
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        # How many reads this connection has had, and that count when a check last
        # found the oldest command past its deadline (None: it was not).
        self._reads = 0
        self._reads_when_overdue: int | None = None
        self._gone: asyncio.Future[None] = loop.create_future()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """The future of `command`'s reply; an error reply is a `ResponseError` result."""
        loop = self._loop
        future = loop.create_future()
        if self.lost:
            future.set_exception(RedisConnectionError(f"{self._where}: connection lost"))
            return future
        deadline = loop.time() + self._timeout
        self._waiting.append((future, deadline))
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(command)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_overdue)
        return future

    def _flush(self) -> None:
        """Write every command queued since the last flush in one write."""
        if self._outgoing and self._transport is not None:
            self._transport.write(b"".join(self._outgoing))
            self._outgoing.clear()

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        self._reads += 1
        reader.feed(data)
        try:
            # RESP2 has no booleans: False only ever means "no complete reply yet".
            reply = reader.gets()
            while reply is not False:
                future = waiting.popleft()[0]
                if not future.done():  # a caller that gave up leaves a cancelled future
                    future.set_result(reply)
                reply = reader.gets()
        except IndexError:
            self._lose(RedisConnectionError, "a reply to no command")
        except ProtocolError as exc:
            self._lose(RedisConnectionError, f"protocol error: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(RedisConnectionError, f"connection lost: {exc}" if exc else "connection closed")
        if not self._gone.done():
            self._gone.set_result(None)

    def _check_overdue(self) -> None:
        """Lose the connection once its oldest command is past its deadline and the
        socket had nothing more to read.

        libuv (under uvloop) runs due timers at the start of each turn, before it polls
        for I/O, so after a stall in an I/O callback this check comes first while the
        reply already sits in the socket. A command found past its deadline is
        therefore judged once more a turn later: by then the loop has read what the
        socket held, and only a connection that read nothing in between is lost.
        """
        self._timer = None
        if not self._waiting:
            self._reads_when_overdue = None
            return
        loop = self._loop
        deadline = self._waiting[0][1]
        if deadline > loop.time():
            self._reads_when_overdue = None
            self._timer = loop.call_at(deadline, self._check_overdue)
        elif self._reads_when_overdue != self._reads:
            self._reads_when_overdue = self._reads
            self._timer = loop.call_later(_OVERDUE_RECHECK_S, self._check_overdue)
        else:
            self._lose(RedisTimeoutError, f"no reply within {self._timeout:g} s")

    def _lose(self, error: type[Exception], why: str) -> None:
        if self.lost:
            return
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outgoing.clear()
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error(f"{self._where}: {why}"))
        if self._transport is not None:
            self._transport.abort()

    def abort(self) -> None:
        """Fail every command in flight and drop the socket."""
        self._lose(RedisConnectionError, "client closed")

    async def close(self) -> None:
        """`abort`, then wait until the socket is closed."""
        self.abort()
        if self._transport is not None:
            await self._gone


class RedisPipe:
    """Redis commands, EVALSHA first of all, over one pipelined, reconnecting connection.

    `path` (a unix socket) wins over `host`/`port`; `ssl` turns on TLS for TCP. Each
    reply is RESP2 as hiredis decodes it (bytes, ints, lists), the same values a
    redis-py client without `decode_responses` returns. See the module docstring for
    what fails how.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str = "",
        db: int = 0,
        username: str = "",
        password: str = "",
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._host, self._port, self._path, self._ssl = host, port, path, ssl
        self._timeout = timeout
        self.where = f"unix:{path}/{db}" if path else f"{host}:{port}/{db}"
        self._handshake: list[bytes] = []
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self._handshake.append(pack_command(auth))
        if db:
            self._handshake.append(pack_command(("SELECT", db)))
        self._scripts: dict[str, bytes] = {}
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str = "",
        password: str = "",
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = 2.0,
    ) -> RedisPipe:
        """An executor for a redis://, rediss:// or unix:// URL, read as redis-py reads it.

        Credentials in the URL win over `username`/`password`. rediss:// without `ssl`
        verifies the server's certificate and name against the system's CAs. Raises
        `ValueError` for query options other than `db`.
        """
        options = parse_url(url)
        options.pop("connection_class", None)
        unsupported = sorted(set(options) - _URL_PARTS)
        if unsupported:
            raise ValueError(f"URL options not supported: {', '.join(unsupported)}")
        if url.startswith("rediss://") and ssl is None:
            ssl = ssl_module.create_default_context()
        return cls(
            host=options.get("host", "localhost"),
            port=int(options.get("port", 6379)),
            path=options.get("path", ""),
            db=int(options.get("db", 0)),
            username=options.get("username") or username,
            password=options.get("password") or password,
            ssl=ssl,
            timeout=timeout,
        )

    def register(self, source: str) -> str:
        """The SHA1 of the script `source`, which is loaded again whenever Redis lacks it."""
        encoded = source.encode()
        sha = hashlib.sha1(encoded).hexdigest()
        self._scripts[sha] = encoded
        return sha

    async def evalsha(self, sha: str, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """The reply of the registered script `sha` run on `keys` and `args`."""
        command = pack_command(("EVALSHA", sha, len(keys), *keys, *args))
        connection = self._connection
        if connection is None or connection.lost:
            connection = await self._connect()
        reply = await connection.send(command)
        if reply.__class__ is ResponseError:
            if _is_noscript(reply):
                await self._load(sha, reply)
                reply = await (await self._connect()).send(command)
            if isinstance(reply, ResponseError):
                raise reply
        return reply

    async def evalsha_many(
        self, sha: str, keys: Sequence[Sequence[Arg]], args: Sequence[Arg]
    ) -> list[Any]:
        """The replies of script `sha` run once per key list, all sent in one write.

        Every script runs (atomically on its own) before the first error reply, if any,
        is raised.
        """
        commands = [pack_command(("EVALSHA", sha, len(each), *each, *args)) for each in keys]
        connection = await self._connect()
        replies = await asyncio.gather(*(connection.send(command) for command in commands))
        missing = [index for index, reply in enumerate(replies) if _is_noscript(reply)]
        if missing:
            await self._load(sha, replies[missing[0]])
            connection = await self._connect()
            again = await asyncio.gather(*(connection.send(commands[i]) for i in missing))
            for index, reply in zip(missing, again, strict=True):
                replies[index] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def execute(self, *command: Arg) -> Any:
        """The reply of one command, e.g. `execute("PING")`."""
        reply = await (await self._connect()).send(pack_command(command))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _load(self, sha: str, noscript: ResponseError) -> None:
        """SCRIPT LOAD the registered script `sha`; raise `noscript` if it is not ours."""
        source = self._scripts.get(sha)
        if source is None:
            raise noscript
        await self.execute("SCRIPT", "LOAD", source)

    async def _connect(self) -> _Connection:
        """The open connection; opens one first if there is none, one attempt at a time."""
        if self._closed:
            raise RedisConnectionError(f"{self.where}: client closed")
        connection = self._connection
        if connection is not None and not connection.lost:
            return connection
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(self._opened)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task is not None and task.cancelling()):
                raise RedisConnectionError(f"{self.where}: client closed") from None
            raise

    def _opened(self, attempt: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()
            if self._closed:  # closed between the attempt's end and this callback
                self._connection.abort()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()

        def protocol() -> _Connection:
            return _Connection(loop, self._timeout, self.where)

        try:
            async with asyncio.timeout(self._timeout):
                if self._path:
                    _, connection = await loop.create_unix_connection(protocol, self._path)
                else:
                    _, connection = await loop.create_connection(
                        protocol, self._host, self._port, ssl=self._ssl
                    )
        except TimeoutError:
            raise RedisTimeoutError(
                f"{self.where}: no connection within {self._timeout:g} s"
            ) from None
        except OSError as exc:
            raise RedisConnectionError(f"{self.where}: cannot connect: {exc}") from exc
        try:
            for reply in await asyncio.gather(*map(connection.send, self._handshake)):
                if isinstance(reply, ResponseError):
                    raise RedisConnectionError(f"{self.where}: {reply}")
        except BaseException:
            await connection.close()
            raise
        return connection

    async def close(self) -> None:
        """Fail every command in flight, close the socket; later commands fail at once."""
        self._closed = True
        attempt = self._connecting
        if attempt is not None:
            attempt.cancel()
            await asyncio.wait([attempt])  # it closes the socket it was opening
        if self._connection is not None:
            await self._connection.close()
