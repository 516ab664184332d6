"""A blocking lock for scripts and programs without an event loop, over the async client.

```python
import quorum_quest.sync

with quorum_quest.sync.lock("billing", "nightly", ttl=30, address="qq:5050") as lease:
    run_report(fencing_token=lease.fencing_token)
```

`Lock` has the shape of redis-py's `Lock` and python-etcd3's `Lock`: `acquire()`,
`release()`, `is_held()`, and `with lock:`. It is no second client: each `Lock` runs
one `QuorumQuestClient` on a private event loop in a thread of its own, and the
lease is kept alive there by the SDK's keep-alive, with the SDK's guarantees (the
lease is trusted only until the send time of its last renewal + ttl − safety
margin; a renewal answered too late never revives it).

What it cannot do is cancel your code: the body of a `with` goes on running when the
lease is lost, and learns of it only on leaving (`LeadershipLost`). Check
`lock.is_held()` (or `lease.ensure_valid()`, which raises `LeadershipLost`) before each
side effect, and pass `lease.fencing_token` to what you protect so that it can refuse a
stale holder.

`close()` (or leaving `lock(...)`) releases the lock if held, closes the connection
and stops the thread: nothing of the lock runs after it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from quorum_quest.client.client import QuorumQuestClient
from quorum_quest.client.connection import ClientTLS
from quorum_quest.client.lease import Lease
from quorum_quest.errors import InvalidArgument, LeadershipLost, QuorumQuestError

T = TypeVar("T")

DEFAULT_ADDRESS = "localhost:5050"


class _LoopThread:
    """An event loop running in a daemon thread of its own, until `stop()`.

    Not anyio's `BlockingPortal`, which does the same otherwise: a `portal.call()`
    interrupted by Ctrl-C leaves its coroutine running on the loop, where a wait for
    the lock would go on and could be granted unseen; `run()` here cancels it and waits
    for its clean-up (a grant given back) before the interruption goes on."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            # Stopped: whatever is left (nothing, after a clean close) is cancelled.
            leftovers = asyncio.all_tasks(self._loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for its result.

        Interrupted while waiting (KeyboardInterrupt), the call is cancelled and its
        clean-up (a grant given back, say) awaited before the interruption goes on.
        """
        finished = threading.Event()

        async def call() -> T:
            try:
                return await coroutine
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                finished.wait()
            raise

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not threading.current_thread():
                self._thread.join()


class Lock:
    """A lock on (service, domain), held by one client identity at a time.

    `acquire()` waits for the lock (up to `timeout` seconds) and keeps it alive in the
    background until `release()`, `close()`, or its loss; `is_held()` says whether the
    lease is still guaranteed. `with Lock(...) as lock:` acquires (raising
    `TimeoutError` after the lock's `timeout`) and releases on exit (raising
    `LeadershipLost` if the lease ended before the block did), and the object can be
    used again; `close()` when done with it stops its thread (so does dropping it).
    Its methods may be called from any thread.
    """

    def __init__(
        self,
        service: str,
        domain: str,
        *,
        ttl: float | timedelta = 15.0,
        address: str | None = None,
        timeout: float | None = None,
        client_id: str | None = None,
        tls: ClientTLS | bool | None = None,
        token: str | None = None,
        keep_alive_interval: float | timedelta | None = None,
        rpc_timeout: float | timedelta | None = None,
        safety_margin: float | timedelta | None = None,
    ) -> None:
        """`address` defaults to `QUORUMQUEST_ADDRESS`, then localhost:5050; `timeout`
        is how long `with lock:` waits (None: as long as it takes). The other arguments
        are `QuorumQuestClient`'s."""
        self.client = QuorumQuestClient(
            service,
            domain,
            ttl,
            address or os.environ.get("QUORUMQUEST_ADDRESS") or DEFAULT_ADDRESS,
            client_id=client_id,
            keep_alive_interval=keep_alive_interval,
            rpc_timeout=rpc_timeout,
            safety_margin=safety_margin,
            tls=tls,
            token=token,
        )
        self.timeout = timeout
        self._calls = threading.Lock()  # one call at a time on the client
        self._entered: Lease | None = None  # the lease `with` entered on
        self._loop: _LoopThread | None = _LoopThread(f"quorum-quest {service}/{domain}")
        # A Lock dropped without close() still stops its thread (its lease then expires).
        self._stop_loop = weakref.finalize(self, self._loop.stop)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._calls:
            if self._loop is None:
                coroutine.close()
                raise RuntimeError("this Lock is closed")
            return self._loop.run(coroutine)

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Acquire the lock and keep it alive; True once held.

        Blocking, it waits until the lock is free (at most `timeout` seconds, then
        returns False); with `blocking=False` it tries once. Already held, it renews.
        An unreachable service is retried while waiting; `ServiceUnavailable` is
        raised only when trying once.
        """
        if not blocking and timeout is not None:
            raise InvalidArgument("timeout", "is for a blocking acquire only")
        return self._run(self._acquire(blocking, timeout))

    async def _acquire(self, blocking: bool, timeout: float | None) -> bool:
        client = self.client
        if not blocking:
            if not await client.try_acquire_lock():
                return False
        else:
            try:
                await client.wait_for_leadership(timeout)
            except TimeoutError:
                return False
        await client.start_keep_alive()
        return True

    def release(self) -> bool:
        """Stop renewing and release the lock; True when this call released it.

        The lease ends for this client either way (see `QuorumQuestClient.release_lock`).
        """
        return self._run(self.client.release_lock())

    def is_held(self) -> bool:
        """Whether this client holds a lease that is still guaranteed."""
        return self.client.is_leader

    @property
    def lease(self) -> Lease | None:
        """The valid lease (its `fencing_token`, `remaining`, `ensure_valid()`), or None."""
        return self.client.lease

    def leader(self) -> tuple[str, int] | None:
        """The holder's client id and fencing token, or None when the lock is free."""
        return self._run(self.client.get_leader())

    def close(self) -> None:
        """Release the lock if held, close the connection and stop the thread."""
        with self._calls:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            try:
                loop.run(self.client.close())
            finally:
                self._stop_loop()

    def __enter__(self) -> Lock:
        if not self.acquire(timeout=self.timeout):
            name = f"{self.client.service}/{self.client.domain}"
            raise TimeoutError(f"could not acquire {name} within {self.timeout:g} s")
        self._entered = self.lease
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Release; raise `LeadershipLost` if the lease ended before the block did (and
        the block raised nothing else): its work may have overlapped another holder's."""
        lease, self._entered = self._entered, None
        if lease is None or lease.is_valid:
            self.release()
            return
        # Best effort: the service may still hold what this client gave up on.
        with suppress(QuorumQuestError):
            self.release()
        if exc_type is None:
            why = lease.end_reason or "expired"
            raise LeadershipLost(f"lost {lease.service}/{lease.domain} within the block: {why}")


@contextmanager
def lock(
    service: str,
    domain: str,
    *,
    ttl: float | timedelta = 15.0,
    address: str | None = None,
    timeout: float | None = None,
    client_id: str | None = None,
    tls: ClientTLS | bool | None = None,
    token: str | None = None,
) -> Iterator[Lease]:
    """Hold (service, domain) for the block: wait for it (raising `TimeoutError` after
    `timeout` seconds), keep it alive, then release it and stop the background thread.

    The block is not interrupted if the lease is lost, only told on leaving it
    (`LeadershipLost`): check `lease.is_valid` or call `lease.ensure_valid()` before
    side effects, and pass on `lease.fencing_token`.
    """
    held = Lock(
        service,
        domain,
        ttl=ttl,
        address=address,
        timeout=timeout,
        client_id=client_id,
        tls=tls,
        token=token,
    )
    try:
        with held:
            lease = held.lease
            if lease is None:  # lost between the grant and here: never enter the block
                raise TimeoutError(f"could not hold {service}/{domain}: the lease ended at once")
            yield lease
    finally:
        held.close()


__all__ = ["Lock", "lock"]
