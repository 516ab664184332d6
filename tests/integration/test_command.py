"""`quorum-quest`, the command, as shell scripts run it: processes against a service
process, statuses and output as documented in docs/cli.md.

Every process a test starts dies with the test run (`DIE_WITH_PARENT`), the commands
run under `quorum-quest lock` too. Nothing is judged by speed: a bound is there only to
end a test that would otherwise hang, and is many leases long.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.backends import DIE_WITH_PARENT, free_port
from tests.pki import Authority, Issued

# Ends a test that would hang; never a measure of speed.
PATIENCE_S = 60.0

NOT_FOUND_LEADER = 120
LOST = 121
UNAVAILABLE = 122
REFUSED = 123
NOT_ACQUIRED = 124
USAGE = 125
CANNOT_EXECUTE = 126
NOT_FOUND = 127

# A command for `lock`: appends "start TOKEN", waits argv[2] seconds, appends "end TOKEN".
RECORD = """
import os, sys, time
path, pause = sys.argv[1], float(sys.argv[2])
token = os.environ["QQ_FENCING_TOKEN"]
def note(text):
    with open(path, "a") as out:
        out.write(text + "\\n")
note(f"start {token}")
time.sleep(pause)
note(f"end {token}")
"""

# A command that runs until stopped: appends "start TOKEN", then "TERM" on SIGTERM, and
# exits 0 there, or with argv[2] == "ignore" goes on running (SIGKILL will end it).
RUN_UNTIL_STOPPED = """
import os, signal, sys, time
path, mode = sys.argv[1], sys.argv[2]
def note(text):
    with open(path, "a") as out:
        out.write(text + "\\n")
def on_term(*_):
    note("TERM")
    if mode != "ignore":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
note(f"start {os.environ['QQ_FENCING_TOKEN']}")
while True:
    time.sleep(0.05)
"""


def python(script: str, *args: str) -> list[str]:
    """A Python command for `lock` to run, dying with its `quorum-quest lock` parent."""
    return [*DIE_WITH_PARENT, sys.executable, "-c", script, *args]


class Service:
    """A `quorum-quest-service` process on the memory store."""

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = workdir / f"service-{self.port}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [*DIE_WITH_PARENT, "-m", "quorum_quest.cli"],
                cwd=workdir,
                env={
                    **os.environ,
                    "QUORUMQUEST_SERVERADDRESS": self.address,
                    "QUORUMQUEST_SERVER_STATELOSSGRACE": "0",
                    **(extra_env or {}),
                },
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def wait_serving(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        deadline = time.monotonic() + PATIENCE_S
        channel = (
            grpc.secure_channel(self.address, credentials)
            if credentials is not None
            else grpc.insecure_channel(self.address)
        )
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"service exited early:\n{self.log.read_text()}")
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise AssertionError("service did not start serving")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)  # in case a test left it paused
        self.process.kill()
        self.process.wait()


def start_service(
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Service:
    service = Service(workdir, extra_env)
    try:
        service.wait_serving(credentials)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service for the tests that only use it (each on locks of its own)."""
    service = start_service(tmp_path_factory.mktemp("service"))
    yield service
    service.stop()


@pytest.fixture
def address(shared_service: Service) -> str:
    return shared_service.address


def quorum_quest(
    *args: str, address: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`quorum-quest ARGS` (as `python -m quorum_quest.command`, which the console script
    calls), against `address` when given."""
    flags = ["--address", address] if address is not None else []
    return subprocess.Popen(
        [*DIE_WITH_PARENT, "-m", "quorum_quest.command", *flags, *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for `process`: its status, stdout and stderr."""
    try:
        out, err = process.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"still running after {PATIENCE_S} s:\n{err}") from None
    return process.returncode, out, err


def run(
    *args: str, address: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    return finish(quorum_quest(*args, address=address, env=env))


def eventually(check: Callable[[], bool], what: str, within: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        time.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- lock ----------------------------------------------------------------------------------


def test_racing_lock_runs_never_overlap_and_their_tokens_rise(address: str, tmp_path: Path) -> None:
    record = tmp_path / "record"
    runs = [
        quorum_quest(
            "lock",
            "--ttl",
            "5",
            "race",
            "one",
            "--",
            *python(RECORD, str(record), "0.2"),
            address=address,
        )
        for _ in range(4)
    ]
    for process in runs:
        status, _, err = finish(process)
        assert status == 0, err
    entries = [line.split() for line in lines(record)]
    assert len(entries) == 8, entries
    # Intervals are disjoint: every start is followed by its own end before the next start.
    tokens = []
    for (first, token), (second, same) in zip(entries[::2], entries[1::2], strict=True):
        assert (first, second) == ("start", "end"), entries
        assert token == same, entries
        tokens.append(int(token))
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


def test_the_command_gets_the_lease_in_its_environment(address: str, tmp_path: Path) -> None:
    seen = tmp_path / "env.json"
    script = (
        "import json, os, sys\n"
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('QQ_')},"
        " open(sys.argv[1], 'w'))\n"
    )
    status, _, err = run(
        "--client-id",
        "nightly-job",
        "lock",
        "--ttl",
        "7",
        "env",
        "eu-west",
        "--",
        *python(script, str(seen)),
        address=address,
    )
    assert status == 0, err
    env = json.loads(seen.read_text())
    assert env["QQ_SERVICE"] == "env"
    assert env["QQ_DOMAIN"] == "eu-west"
    assert env["QQ_CLIENT_ID"] == "nightly-job"
    assert float(env["QQ_LEASE_TTL"]) == 7
    assert int(env["QQ_FENCING_TOKEN"]) > 0
    # Released when the command exited.
    assert run("leader", "env", "eu-west", address=address)[0] == NOT_FOUND_LEADER


def test_a_killed_holder_is_replaced_once_its_lease_runs_out(address: str, tmp_path: Path) -> None:
    record = tmp_path / "record"
    ttl = 2
    holder = quorum_quest(
        "lock",
        "--ttl",
        str(ttl),
        "killed",
        "one",
        "--",
        *python(RUN_UNTIL_STOPPED, str(record), "exit"),
        address=address,
    )
    try:
        eventually(lambda: len(lines(record)) == 1, "the holder's command started")
        successor = quorum_quest(
            "lock",
            "--ttl",
            str(ttl),
            "killed",
            "one",
            "--",
            *python(RECORD, str(record), "0"),
            address=address,
        )
        time.sleep(1.0)  # the successor is waiting, not running
        assert len(lines(record)) == 1
        holder.send_signal(signal.SIGKILL)  # no release: the lease has to run out
        # Within the ttl, on an idle machine; the bound leaves room for a loaded one.
        eventually(lambda: len(lines(record)) > 1, "the successor ran", within=ttl * 10)
        status, _, err = finish(successor)
    finally:
        holder.kill()
        holder.wait()
    assert status == 0, err
    (_, first), (_, second), (_, end) = (line.split() for line in lines(record))
    assert int(second) > int(first) and second == end


def test_losing_the_lease_sends_the_command_sigterm_and_exits_121(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    record = tmp_path / "record"
    try:
        holder = quorum_quest(
            "lock",
            "--ttl",
            "2",
            "--kill-grace",
            "30",
            "lost",
            "one",
            "--",
            *python(RUN_UNTIL_STOPPED, str(record), "exit"),
            address=service.address,
        )
        eventually(lambda: len(lines(record)) == 1, "the command started")
        # A service that stops answering for longer than the lease: the lease cannot
        # be renewed, so quorum-quest must stop the command itself.
        service.process.send_signal(signal.SIGSTOP)
        status, _, err = finish(holder)
    finally:
        service.stop()
    assert status == LOST, err
    assert lines(record)[1:] == ["TERM"]
    assert "lost lost/one" in err
    assert "Traceback" not in err


def test_a_command_that_ignores_sigterm_gets_sigkill_after_the_grace(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    record = tmp_path / "record"
    try:
        holder = quorum_quest(
            "lock",
            "--ttl",
            "2",
            "--kill-grace",
            "0.5",
            "stubborn",
            "one",
            "--",
            *python(RUN_UNTIL_STOPPED, str(record), "ignore"),
            address=service.address,
        )
        eventually(lambda: len(lines(record)) == 1, "the command started")
        child = _only_child(holder.pid)
        service.process.send_signal(signal.SIGSTOP)
        status, _, err = finish(holder)
    finally:
        service.stop()
    assert status == LOST, err
    assert lines(record)[1:] == ["TERM"]
    assert not Path(f"/proc/{child}").exists() or "zombie" in _state(child)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: SigCgt in its status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    (mask,) = (line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _only_child(pid: int) -> int:
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return "zombie"


def test_signals_go_to_the_command_and_its_status_is_the_exit_status(
    address: str, tmp_path: Path
) -> None:
    record = tmp_path / "record"
    holder = quorum_quest(
        "lock",
        "signals",
        "one",
        "--",
        *python(RUN_UNTIL_STOPPED, str(record), "exit"),
        address=address,
    )
    eventually(lambda: len(lines(record)) == 1, "the command started")
    holder.send_signal(signal.SIGTERM)
    status, _, err = finish(holder)
    assert status == 0, err  # the command's own exit status, after its SIGTERM handler
    assert lines(record)[1:] == ["TERM"]
    assert run("leader", "signals", "one", address=address)[0] == NOT_FOUND_LEADER


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
        (["no-such-command-anywhere"], NOT_FOUND),
        (["/dev/null"], CANNOT_EXECUTE),
    ],
)
def test_lock_exits_with_the_commands_status(
    address: str, command: list[str], expected: int
) -> None:
    status, _, err = run("lock", "statuses", "one", "--", *command, address=address)
    assert status == expected, err
    assert "Traceback" not in err


def test_a_held_lock_is_not_acquired_in_time_and_exits_124(address: str, tmp_path: Path) -> None:
    record = tmp_path / "record"
    holder = quorum_quest(
        "lock",
        "busy",
        "one",
        "--",
        *python(RUN_UNTIL_STOPPED, str(record), "exit"),
        address=address,
    )
    try:
        eventually(lambda: len(lines(record)) == 1, "the holder's command started")
        for wait in ("0", "0.5"):
            status, _, err = run(
                "lock", "--wait", wait, "busy", "one", "--", "true", address=address
            )
            assert status == NOT_ACQUIRED, err
            assert err.count("\n") == 1 and "busy/one" in err
        # A signal ends the wait (there is no command yet to pass it to).
        waiter = quorum_quest("lock", "busy", "one", "--", "true", address=address)
        eventually(lambda: catches(waiter.pid, signal.SIGTERM), "the waiter handles SIGTERM")
        waiter.send_signal(signal.SIGTERM)
        status, _, err = finish(waiter)
        assert status == 128 + signal.SIGTERM, err
        assert holder.poll() is None and lines(record) == lines(record)[:1]
    finally:
        holder.send_signal(signal.SIGTERM)
        finish(holder)


def test_an_unreachable_service_exits_122_on_one_line() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    for args in (["lock", "a", "b", "--", "true"], ["leader", "a", "b"], ["status"]):
        status, out, err = run(*args, address=nowhere)
        assert status == UNAVAILABLE, err
        assert err.count("\n") == 1 and err.startswith("quorum-quest: service unavailable")
        assert out == ""


@pytest.mark.parametrize(
    "args",
    [
        ["lock", "a", "b"],  # no command
        ["lock", "--ttl", "-1", "a", "b", "--", "true"],
        ["leader", "a"],
        ["status", "--", "true"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_125(args: list[str]) -> None:
    status, _, err = run(*args)
    assert status == USAGE, err
    assert "Traceback" not in err


def test_help_documents_the_commands_and_exit_statuses() -> None:
    status, out, _ = run("--help")
    assert status == 0
    for word in ("lock", "elect", "leader", "watch", "status", "124", "QUORUMQUEST_ADDRESS"):
        assert word in out
    status, out, _ = run("lock", "--help")
    assert status == 0 and "QQ_FENCING_TOKEN" in out and "--kill-grace" in out


def test_tls_and_token_come_from_flags_or_the_environment(
    tmp_path: Path, ca: Authority, server_cert: Issued
) -> None:
    (tmp_path / "tokens.yaml").write_text("ops: token-of-ops\n")
    token_file = tmp_path / "token"
    token_file.write_text("token-of-ops\n")
    rules = '[{"identity": "ops", "locks": "*", "allow": ["lock", "read", "admin"]}]'
    service = start_service(
        tmp_path,
        {
            "QUORUMQUEST_SERVER_TLS_CERTFILE": str(server_cert.cert_file),
            "QUORUMQUEST_SERVER_TLS_KEYFILE": str(server_cert.key_file),
            "QUORUMQUEST_AUTH_TOKENSFILE": str(tmp_path / "tokens.yaml"),
            "QUORUMQUEST_AUTH_RULES": rules,
        },
        grpc.ssl_channel_credentials(ca.cert_file.read_bytes()),
    )
    ca_file, at = str(ca.cert_file), service.address
    try:
        status, out, err = run(
            "--ca-file", ca_file, "--token-file", str(token_file), "status", address=at
        )
        assert status == 0, err
        assert "memory" in out
        status, _, err = run("--ca-file", ca_file, "leader", "s", "d", address=at)
        assert status == REFUSED, err
        assert err.startswith("quorum-quest: refused: UNAUTHENTICATED")
        assert "token-of-ops" not in err
        status, _, err = run("--token-file", str(token_file), "status", address=at)
        assert status == UNAVAILABLE, err  # plaintext to a TLS port
        status, _, err = run(
            "--ca-file", ca_file, "--token-file", str(tmp_path / "none"), "status", address=at
        )
        assert status == USAGE and "--token-file" in err, err
        environment = {"QUORUMQUEST_TLS_CA_FILE": ca_file, "QUORUMQUEST_TOKEN": "token-of-ops"}
        status, _, err = run("lock", "s", "d", "--", "true", address=at, env=environment)
        assert status == 0, err
        status, _, err = run("leader", "s", "d", env={**environment, "QUORUMQUEST_ADDRESS": at})
        assert status == NOT_FOUND_LEADER, err
    finally:
        service.stop()


# -- elect, leader, status -------------------------------------------------------------------


def test_elect_leads_until_interrupted_and_leader_and_status_show_it(address: str) -> None:
    assert run("leader", "elect", "one", address=address)[0] == NOT_FOUND_LEADER
    candidate = quorum_quest("elect", "elect", "one", "--value", "candidate-1", address=address)
    try:
        assert candidate.stdout is not None
        value, token = candidate.stdout.readline().split()
        assert value == "candidate-1"

        status, out, err = run("leader", "elect", "one", address=address)
        assert status == 0, err
        assert out.startswith(f"candidate-1 fencing_token={token} remaining=")

        status, out, err = run("leader", "elect", "one", "--json", address=address)
        assert status == 0, err
        leader = json.loads(out)
        assert (leader["client_id"], leader["fencing_token"]) == ("candidate-1", int(token))
        assert leader["has_leader"] and 0 < leader["remaining_s"] <= 15

        status, out, err = run("status", "--json", address=address)
        assert status == 0, err
        described = json.loads(out)
        assert described["backend"] == "memory" and described["store_reachable"]
        assert described["held_leases"] >= 1

        status, out, err = run("status", address=address)
        assert status == 0, err
        assert "backend:" in out and "memory" in out

        candidate.send_signal(signal.SIGINT)
        status, _, err = finish(candidate)
        assert status == 0, err
    finally:
        candidate.kill()
        candidate.wait()
    status, out, _ = run("leader", "elect", "one", address=address)
    assert (status, out) == (NOT_FOUND_LEADER, "no leader\n")
    status, out, _ = run("leader", "elect", "one", "--json", address=address)
    assert status == NOT_FOUND_LEADER and json.loads(out)["has_leader"] is False


# -- watch -----------------------------------------------------------------------------------


def read_changes(watcher: subprocess.Popen[str], count: int) -> list[dict[str, object]]:
    """The next `count` lines of a `watch --json`, parsed (the test's timeout ends a hang)."""
    assert watcher.stdout is not None
    return [json.loads(watcher.stdout.readline()) for _ in range(count)]


def test_watch_prints_every_change_of_a_scripted_sequence(address: str) -> None:
    anchor = quorum_quest("elect", "watched", "zero", "--value", "anchor", address=address)
    one = quorum_quest("watch", "--json", "watched", "one", address=address)
    service = None
    try:
        assert anchor.stdout is not None and anchor.stdout.readline()
        service = quorum_quest("watch", "--json", "watched", address=address)
        # Both watches have begun once they reported the state they started from.
        (first,) = read_changes(one, 1)
        assert (first["kind"], first["client_id"]) == ("current", "")
        (held,) = read_changes(service, 1)
        assert (held["domain"], held["kind"], held["client_id"]) == ("zero", "current", "anchor")

        # Granted and released by a command; granted to a candidate that is then killed,
        # so its lease expires unannounced.
        status, _, err = run(
            "--client-id", "job", "lock", "watched", "one", "--", "true", address=address
        )
        assert status == 0, err
        candidate = quorum_quest(
            "elect", "--ttl", "1", "--value", "doomed", "watched", "one", address=address
        )
        assert candidate.stdout is not None and candidate.stdout.readline()
        candidate.kill()
        candidate.wait()

        expected = [("granted", "job"), ("released", ""), ("granted", "doomed"), ("expired", "")]
        for watcher in (one, service):
            changes = read_changes(watcher, len(expected))
            assert [(c["kind"], c["client_id"]) for c in changes] == expected, changes
            assert {c["domain"] for c in changes} == {"one"}
            assert not any(c["gap"] for c in changes)
            granted = [c["fencing_token"] for c in changes if c["kind"] == "granted"]
            assert granted[0] < granted[1]  # type: ignore[operator]
        for watcher in (one, service):
            watcher.send_signal(signal.SIGINT)
            status, _, err = finish(watcher)
            assert status == 0, err
    finally:
        for process in (anchor, one, service):
            if process is not None:
                process.kill()
                process.wait()


def test_watch_prints_one_line_per_change_for_people(address: str) -> None:
    watcher = quorum_quest("watch", "people", "one", address=address)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split()[1:] == ["people/one", "current"]
        assert (
            run("--client-id", "job", "lock", "people", "one", "--", "true", address=address)[0]
            == 0
        )
        granted = watcher.stdout.readline().split()
        assert granted[1:4] == ["people/one", "granted", "job"]
        assert granted[4].startswith("fencing_token=")
        assert watcher.stdout.readline().split()[1:] == ["people/one", "released"]
    finally:
        watcher.kill()
        watcher.wait()
