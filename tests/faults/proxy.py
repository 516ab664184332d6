"""A TCP proxy between a service instance and its backend, steered by the test.

It listens on 127.0.0.1 only and runs its own event loop in a thread of the test
process. Modes:

- pass: bytes flow both ways (after `delay` seconds each way, when one is set);
- blackhole: a partition as TCP lives it. Nothing is forwarded, nothing is refused:
  connections stay open, bytes sent meanwhile are held, new connections are accepted
  but not connected onwards. On `heal()` everything held is delivered, in order, also
  what clients sent before they gave up and closed: requests the service has long
  written off reach the backend late. That is the nasty case;
- reset: every connection is torn down with a TCP reset and new ones are reset at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any

CHUNK = 65536
# A held chunk, stamped with its arrival (loop time); None stands for end of stream.
Held = tuple[float, bytes | None]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Forwards 127.0.0.1:`port` to `upstream_host`:`upstream_port`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.mode = "pass"
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()

    # -- the test's side (any thread) ---------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self._run(self._start())
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def pass_through(self, delay: float = 0.0) -> None:
        """Forward everything (each chunk `delay` seconds late); deliver what was held."""
        self._run(self._set("pass", delay))

    def heal(self) -> None:
        """Back to plain forwarding."""
        self.pass_through()

    def blackhole(self) -> None:
        self._run(self._set("blackhole", self.delay))

    def reset(self) -> None:
        self._run(self._set("reset", self.delay))

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # -- the proxy's loop -------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _set(self, mode: str, delay: float) -> None:
        assert self._flowing is not None
        self.mode, self.delay = mode, delay
        if mode == "blackhole":
            self._flowing.clear()
            return
        if mode == "reset":
            for link in list(self._links):
                link.abort()
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            _reset(writer)
            return
        link = _Link(self, reader, writer)
        self._links.add(link)
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # the proxy is closing: end quietly
        finally:
            self._links.discard(link)

    async def flowing(self) -> None:
        """Return once bytes may flow (at once, unless in blackhole)."""
        assert self._flowing is not None
        await self._flowing.wait()


class _Link:
    """One proxied connection: two directions, each a reader filling a queue and a writer."""

    def __init__(
        self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        outbound: asyncio.Queue[Held] = asyncio.Queue()
        inbound: asyncio.Queue[Held] = asyncio.Queue()
        self.tasks = [loop.create_task(self._read(self.client[0], outbound))]
        try:
            await self.proxy.flowing()  # a connection made in a blackhole waits here
            self.upstream = await asyncio.open_connection(*self.proxy.upstream)
        except OSError:
            self.abort()
            return
        self.tasks += [
            loop.create_task(self._write(outbound, self.upstream[1])),
            loop.create_task(self._read(self.upstream[0], inbound)),
            loop.create_task(self._write(inbound, self.client[1])),
        ]
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        if any(isinstance(result, BaseException) for result in results):
            self.abort()
        else:
            self._close()

    @staticmethod
    async def _read(reader: asyncio.StreamReader, queue: asyncio.Queue[Held]) -> None:
        """Queue what arrives; the end of the stream also when it ends in an error."""
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time(), chunk))
        finally:
            queue.put_nowait((loop.time(), None))

    async def _write(self, queue: asyncio.Queue[Held], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            arrived, chunk = await queue.get()
            while True:  # held while in blackhole; `delay` after arrival otherwise
                await self.proxy.flowing()
                wait = arrived + self.proxy.delay - loop.time()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if chunk is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    def _close(self) -> None:
        for _, writer in filter(None, (self.client, self.upstream)):
            writer.close()

    def abort(self) -> None:
        for task in self.tasks:
            task.cancel()
        for _, writer in filter(None, (self.client, self.upstream)):
            _reset(writer)
