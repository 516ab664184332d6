"""`quorum_quest.sync`: the blocking lock, against a service process (the sync facade
blocks its caller, so the service cannot share the test's event loop)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import quorum_quest.sync
from quorum_quest.errors import LeadershipLost
from tests.integration.test_command import PATIENCE_S, Service, start_service


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service = start_service(tmp_path_factory.mktemp("sync-service"))
    yield service.address
    service.stop()


def lock_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("quorum-quest ")]


def eventually(check: object, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {PATIENCE_S} s: {what}")
        time.sleep(0.05)


def test_acquire_keeps_the_lock_until_release(address: str) -> None:
    lock = quorum_quest.sync.Lock("sync", "basic", ttl=2, address=address, client_id="me")
    try:
        assert not lock.is_held() and lock.lease is None
        assert lock.acquire()
        assert lock.is_held()
        lease = lock.lease
        assert lease is not None
        assert lock.leader() == ("me", lease.fencing_token)
        time.sleep(5)  # two and a half leases: renewed in the background meanwhile
        assert lock.is_held()
        assert lock.leader() == ("me", lease.fencing_token)
        assert lock.release()
        assert not lock.is_held() and not lease.is_valid
        assert lock.leader() is None
    finally:
        lock.close()


def test_a_held_lock_is_not_acquired_until_released(address: str) -> None:
    first = quorum_quest.sync.Lock("sync", "contended", ttl=5, address=address)
    second = quorum_quest.sync.Lock("sync", "contended", ttl=5, address=address)
    try:
        assert first.acquire()
        assert not second.acquire(blocking=False)
        assert not second.acquire(timeout=0.3)
        assert first.lease is not None
        token = first.lease.fencing_token

        releaser = threading.Timer(0.5, first.release)
        releaser.start()
        assert second.acquire(timeout=PATIENCE_S)  # waits for the release
        releaser.join()
        assert not first.is_held() and second.is_held()
        assert second.lease is not None and second.lease.fencing_token > token
    finally:
        first.close()
        second.close()


def test_lock_holds_for_the_block_then_releases_and_stops_its_thread(address: str) -> None:
    observer = quorum_quest.sync.Lock("sync", "block", address=address)
    try:
        with quorum_quest.sync.lock(
            "sync", "block", ttl=3, address=address, client_id="worker"
        ) as lease:
            assert lease.is_valid and lease.client_id == "worker"
            assert observer.leader() == ("worker", lease.fencing_token)
            assert len(lock_threads()) == 2  # the observer's and the block's
        assert not lease.is_valid
        assert observer.leader() is None
        assert len(lock_threads()) == 1
    finally:
        observer.close()
    assert lock_threads() == []


def test_a_lock_object_is_a_reusable_context_manager_with_a_timeout(address: str) -> None:
    holder = quorum_quest.sync.Lock("sync", "reuse", address=address)
    waiter = quorum_quest.sync.Lock("sync", "reuse", address=address, timeout=0.3)
    try:
        with holder:
            assert holder.is_held()
            with pytest.raises(TimeoutError, match="sync/reuse"):
                with waiter:
                    pass
        assert not holder.is_held()
        with waiter:
            assert waiter.is_held()
        with holder:
            assert holder.is_held()
    finally:
        holder.close()
        waiter.close()


def test_close_releases_and_nothing_runs_after_it(address: str) -> None:
    lock = quorum_quest.sync.Lock("sync", "closed", address=address)
    observer = quorum_quest.sync.Lock("sync", "closed", address=address)
    try:
        assert lock.acquire()
        lock.close()
        lock.close()  # again: nothing to do
        assert observer.leader() is None
        with pytest.raises(RuntimeError, match="closed"):
            lock.acquire()
    finally:
        observer.close()
    assert lock_threads() == []


def test_a_lost_lease_is_no_longer_held_and_the_block_learns_it_on_exit(
    tmp_path: Path,
) -> None:
    service: Service = start_service(tmp_path)
    lock = quorum_quest.sync.Lock("sync", "lost", ttl=1, address=service.address)
    try:
        with pytest.raises(LeadershipLost, match="sync/lost"):
            with lock:
                lease = lock.lease
                assert lease is not None
                service.process.send_signal(signal.SIGSTOP)  # no renewal gets an answer
                eventually(lambda: not lock.is_held(), "the lease ended")
                with pytest.raises(LeadershipLost):
                    lease.ensure_valid()
    finally:
        service.process.send_signal(signal.SIGCONT)
        lock.close()
        service.stop()
