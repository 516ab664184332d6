"""What the clients saw, on one clock, and the checker that judges it.

Every event carries `time.monotonic()` readings. On Linux that is CLOCK_MONOTONIC,
one clock for the whole machine, so events recorded by the client processes and by
the test process can be merged and compared directly.

The checker never trusts a client's own idea of whether it leads: it derives each
client's *belief* from the calls it made and the answers it got.

- A belief starts when an acquire answered `is_leader` is received, unless that
  answer came too late (at or after its send time + the granted ttl).
- It lasts until the send time of the last successful acquire or keep-alive + the
  ttl that answer granted. An acquire the service held back (`wait_ms`, waiting for
  a release) counts from its send time + what the service says it `waited` before
  the attempt that granted it: the lease cannot have begun earlier. An answer that
  arrives after the belief ended never extends or revives it.
- It ends early only when the client sends a release for it (answered or not).
  A refused keep-alive, or one that names another fencing token, does not extend it
  but does not end it either: what the client does on learning it is refused is its
  own business, the belief is bounded by what the service last confirmed.
- A failed call (any non-OK status, a cancelled call) changes nothing: "I do not know".

The property, for one lock: beliefs of different clients never overlap; the fencing
tokens of successive grants strictly increase (no token is ever believed again after
another one, nor by two clients); and every `Act` a client recorded (a fenced side
effect) lies inside one of its own beliefs with that token. Liveness: how long the
lock stays without a believer (`Takeover`), measured from the end of the last belief,
or from the end of a `blocking` fault (one during which grants may be impossible), or
from the moment a fault takes its victims away.

On a loaded machine processes wait for a CPU, and a takeover can outlast its bound
through no fault of the product. So every client process, and the test process, runs
a lag probe: it sleeps `PROBE_S` at a time and records each wake-up later than
`STALL_MIN_S` as a `Stall` (from when it was due to wake to when it woke: a time that
process could not run). A takeover's bound is extended by the longest stall inside it
(clipped to the takeover), across those processes, leaving out the stalls of a process
while a fault paused it on purpose. On an idle machine stalls are a few milliseconds,
so the bound stays as tight as it was; safety is never relaxed by a stall.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

ACQUIRE = "acquire"
KEEP_ALIVE = "keep_alive"
RELEASE = "release"
# The lag probe: how long it sleeps, and the least lateness it records as a `Stall`.
PROBE_S = 0.05
STALL_MIN_S = 0.01


@dataclass(frozen=True, slots=True)
class Call:
    """One RPC a client made and what it learned from it.

    `granted` is the answer: acquire `is_leader`, keep-alive renewed (`lease_length` > 0),
    release `released`. `token` is the answer's fencing token (for a release: the token the
    request named, 0 for any), `ttl` the lease length the answer granted and `waited` how
    long the service says it waited before granting an acquire, in seconds. `via` is the
    service instance (or gRPC target) the call went to.
    """

    client: str
    op: str
    send: float
    recv: float
    ok: bool
    code: str = "OK"
    granted: bool = False
    token: int = 0
    ttl: float = 0.0
    waited: float = 0.0
    via: str = ""


@dataclass(frozen=True, slots=True)
class Act:
    """A side effect a client took as holder of `token`, at `at`. `checked`: the client
    checked its lease was still valid at `at`; otherwise it acted on being told it leads
    (on entering `leadership()`, as the README's example does)."""

    client: str
    token: int
    at: float
    checked: bool = True


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """A fault the test injected at `start` and healed at `end` (== start if instantaneous).

    `blocking`: liveness is owed only from `end`, as grants may be impossible until then
    (the only service instance was down or cut off from its backend, or every backend call
    was slower than the callers' deadlines). `victims`: the clients the fault took away;
    another client must lead within the bound from `start`.
    """

    name: str
    start: float
    end: float
    blocking: bool = False
    victims: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Stall:
    """`process` could not run from `start` (when its lag probe was due to wake) to `end`
    (when it woke): the scheduler or its own event loop held it up. `clients`: the clients
    that process runs (none for the test process)."""

    process: str
    start: float
    end: float
    clients: tuple[str, ...] = ()

    @property
    def length(self) -> float:
        return self.end - self.start


Event = Call | Act | FaultWindow | Stall
_KINDS: dict[str, type[Event]] = {"call": Call, "act": Act, "fault": FaultWindow, "stall": Stall}
_NAMES = {kind: name for name, kind in _KINDS.items()}


class Recorder:
    """Appends events to a JSON-lines file, one flushed line each (readable while running)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def record(self, event: Event) -> None:
        line = json.dumps({"kind": _NAMES[type(event)], **asdict(event)})
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_events(path: Path) -> Iterator[Event]:
    """The events of one file; a last line cut short (a killed writer) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return
            raise
        kind = _KINDS[raw.pop("kind")]
        if kind is FaultWindow:
            raw["victims"] = tuple(raw["victims"])
        elif kind is Stall:
            raw["clients"] = tuple(raw["clients"])
        yield kind(**raw)


@dataclass
class History:
    """Everything recorded in one run; `stop` is when the test began stopping the clients."""

    stop: float
    calls: list[Call] = field(default_factory=list)
    acts: list[Act] = field(default_factory=list)
    faults: list[FaultWindow] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)

    def add(self, events: Iterable[Event]) -> History:
        for event in events:
            if isinstance(event, Call):
                self.calls.append(event)
            elif isinstance(event, Act):
                self.acts.append(event)
            elif isinstance(event, Stall):
                self.stalls.append(event)
            else:
                self.faults.append(event)
        return self

    @classmethod
    def load(cls, paths: Iterable[Path], stop: float) -> History:
        history = cls(stop)
        for path in paths:
            history.add(read_events(path))
        return history


@dataclass(frozen=True, slots=True)
class Belief:
    """`client` believed it held the lease with fencing token `token` from `start` to `end`."""

    client: str
    token: int
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Takeover:
    """The lock had no believer from `start` (as the liveness bound counts) to `end`;
    `stall`: the longest stall of a probed process within that time, added to the bound."""

    what: str
    start: float
    end: float
    stall: float = 0.0

    @property
    def length(self) -> float:
        return self.end - self.start


def client_beliefs(calls: Iterable[Call]) -> list[Belief]:
    """The beliefs of one client, from its calls (see the module docstring)."""
    # Answers take effect when received; a release when it is sent.
    effects = sorted(
        ((call.send if call.op == RELEASE else call.recv), index, call)
        for index, call in enumerate(calls)
        if call.ok or call.op == RELEASE
    )
    beliefs: list[Belief] = []
    current: Belief | None = None  # with `end` = the deadline so far

    def close(at: float) -> None:
        nonlocal current
        if current is not None and min(at, current.end) > current.start:
            beliefs.append(
                Belief(current.client, current.token, current.start, min(at, current.end))
            )
        current = None

    for at, _, call in effects:
        if current is not None and current.end <= at:
            close(current.end)
        if call.op == RELEASE:
            if current is not None and call.token in (0, current.token):
                close(at)
        elif call.op == ACQUIRE and call.granted:
            expiry = call.send + call.waited + call.ttl
            if current is not None and current.token == call.token:
                current = Belief(call.client, call.token, current.start, max(current.end, expiry))
                continue
            close(at)
            if at < expiry:
                current = Belief(call.client, call.token, at, expiry)
        elif (
            call.op == KEEP_ALIVE
            and call.granted
            and current is not None
            and call.token == current.token
        ):
            current = Belief(
                call.client, call.token, current.start, max(current.end, call.send + call.ttl)
            )
    if current is not None:
        close(current.end)
    return beliefs


def all_beliefs(calls: Iterable[Call]) -> list[Belief]:
    """Every client's beliefs, ordered by start."""
    by_client: dict[str, list[Call]] = {}
    for call in calls:
        by_client.setdefault(call.client, []).append(call)
    beliefs = [belief for mine in by_client.values() for belief in client_beliefs(mine)]
    return sorted(beliefs, key=lambda belief: (belief.start, belief.end))


def grants(beliefs: Iterable[Belief]) -> int:
    """How many grants the beliefs stem from (one per client and token)."""
    return len({(belief.client, belief.token) for belief in beliefs})


def overlaps(beliefs: list[Belief]) -> list[tuple[Belief, Belief]]:
    """Pairs of beliefs of different clients that overlap in time (`beliefs` ordered by start)."""
    found = []
    active: list[Belief] = []
    for belief in beliefs:
        active = [other for other in active if other.end > belief.start]
        found.extend((other, belief) for other in active if other.client != belief.client)
        active.append(belief)
    return found


def token_violations(beliefs: list[Belief]) -> list[str]:
    """Grants whose token is not above every token believed before (`beliefs` by start).

    Consecutive beliefs of one client with one token are one grant (a lapsed belief the
    service confirmed again); anything else that repeats or lowers a token is a violation.
    """
    found = []
    seen: set[int] = set()
    previous: Belief | None = None
    for belief in beliefs:
        if previous is not None and (belief.client, belief.token) == (
            previous.client,
            previous.token,
        ):
            previous = belief
            continue
        highest = max(seen, default=0)
        if belief.token in seen:
            found.append(
                f"token {belief.token} granted again, to {belief.client} at {belief.start:.3f}"
            )
        elif belief.token < highest:
            found.append(
                f"token {belief.token} of {belief.client} at {belief.start:.3f} is below {highest}"
            )
        seen.add(belief.token)
        previous = belief
    return found


def stale_acts(beliefs: list[Belief], acts: Iterable[Act]) -> list[Act]:
    """Acts taken outside every belief of their client with their token."""
    return [
        act
        for act in acts
        if not any(
            belief.client == act.client
            and belief.token == act.token
            and belief.start <= act.at < belief.end
            for belief in beliefs
        )
    ]


def largest_stall(
    stalls: Iterable[Stall], faults: Iterable[FaultWindow], start: float, end: float
) -> float:
    """The longest stall within `start`..`end` (each clipped to it), of any probed process.

    A stall of a process while a fault took its clients away (SIGSTOP) is the fault
    itself, not load: it is left out."""
    faults = list(faults)

    def paused(stall: Stall) -> bool:
        return any(
            set(stall.clients) & set(fault.victims)
            and fault.start < stall.end
            and fault.end > stall.start
            for fault in faults
        )

    return max(
        (
            min(end, stall.end) - max(start, stall.start)
            for stall in stalls
            if stall.start < end and stall.end > start and not paused(stall)
        ),
        default=0.0,
    )


def takeovers(
    beliefs: list[Belief],
    faults: list[FaultWindow],
    stop: float,
    phantoms: Iterable[Call] = (),
    stalls: Iterable[Stall] = (),
) -> list[Takeover]:
    """How long the lock went without a believer, as the liveness bound counts it.

    Each gap between beliefs (and the one still open at `stop`) counts from its start,
    or from the end of a blocking fault it overlaps. Each fault with victims counts
    from its start to the first belief of a client it did not take away, or of a
    victim once the fault has healed (a victim back in the race is an ordinary client;
    as a fault with victims lasts longer than the bound, a victim that only leads again
    after it still fails the bound). A phantom
    grant (granted to a client that could not believe it: paused, or cut off) is a
    holder that disappeared as it was granted: a takeover counts from it, at the
    earliest moment the service can have granted it (send + waited), when later.
    Each takeover carries the longest stall within it (`largest_stall`).
    """
    stalls = list(stalls)
    granted_at = sorted(call.send + call.waited for call in phantoms)

    def from_phantoms(start: float, end: float) -> float:
        return max([start, *(at for at in granted_at if start <= at < end)])

    found: list[Takeover] = []
    if beliefs:
        gaps = []
        covered = beliefs[0].end
        for belief in beliefs[1:]:
            if belief.start > covered:
                gaps.append((covered, belief.start, f"{belief.client} after a gap"))
            covered = max(covered, belief.end)
        if stop > covered:
            gaps.append((covered, stop, "nobody by the end"))
        for start, end, what in gaps:
            for fault in faults:
                if fault.blocking and fault.start < end and fault.end > start:
                    start = max(start, fault.end)
            start = from_phantoms(start, end)
            if end > start:
                found.append(Takeover(what, start, end, largest_stall(stalls, faults, start, end)))
    for fault in faults:
        if not fault.victims:
            continue
        successors = [
            belief.start
            for belief in beliefs
            if belief.start >= fault.start
            and (belief.client not in fault.victims or belief.start >= fault.end)
        ]
        end = min(successors, default=stop)
        start = from_phantoms(fault.start, end)
        stall = largest_stall(stalls, faults, start, end)
        found.append(Takeover(f"after {fault.name}", start, end, stall))
    return found


def phantom_grants(calls: Iterable[Call], faults: Iterable[FaultWindow] = ()) -> list[Call]:
    """Acquires the service granted to a client that could not lead on them: the answer
    came too late to be believed, or the service can have granted it while a fault had
    its client away (paused, cut off) and the answer reached it only as the fault healed.
    Either way the service held the lock, from its grant on, for a holder that was gone."""
    takeaways = [fault for fault in faults if fault.victims]

    def taken_away(call: Call) -> bool:
        granted_at = call.send + call.waited
        return any(
            call.client in fault.victims and fault.start < granted_at < fault.end <= call.recv
            for fault in takeaways
        )

    return [
        call
        for call in calls
        if call.op == ACQUIRE
        and call.granted
        and (call.recv >= call.send + call.waited + call.ttl or taken_away(call))
    ]


@dataclass
class Report:
    """The checker's verdict on one history."""

    beliefs: list[Belief]
    overlaps: list[tuple[Belief, Belief]]
    token_violations: list[str]
    stale_acts: list[Act]
    takeovers: list[Takeover]
    phantom_grants: list[Call]

    @property
    def stale_entries(self) -> list[Act]:
        """Stale acts taken without a check, on being told the lease was ours."""
        return [act for act in self.stale_acts if not act.checked]

    @property
    def grants(self) -> int:
        return grants(self.beliefs)

    @property
    def max_takeover(self) -> Takeover | None:
        return max(self.takeovers, key=lambda takeover: takeover.length, default=None)

    def summary(self, backend: str, fault: str, bound: float) -> str:
        longest = self.max_takeover
        length, stall = (longest.length, longest.stall) if longest else (0.0, 0.0)
        return (
            f"FAULT {backend} {fault}: grants={self.grants} overlaps={len(self.overlaps)} "
            f"token_regressions={len(self.token_violations)} "
            f"max_takeover={length:.2f}s (bound {bound:.2f}s + stall {stall:.2f}s)"
        )

    def safety_problems(self) -> list[str]:
        """Overlapping beliefs, tokens that did not rise, checked acts outside a belief
        (`stale_entries` are left to the caller)."""
        found = [
            f"overlap: {first.client} (token {first.token}) believed until {first.end:.3f}, "
            f"{second.client} (token {second.token}) from {second.start:.3f}"
            for first, second in self.overlaps
        ]
        found += self.token_violations
        found += [
            f"stale act: {act.client} acted as {act.token} at {act.at:.3f}"
            for act in self.stale_acts
            if act.checked
        ]
        return found

    def liveness_problems(self, bound: float, min_grants: int) -> list[str]:
        """Too few grants, or the lock without a believer for longer than `bound` + the
        longest stall within that time (the time a process could not run)."""
        found = []
        if self.grants < min_grants:
            found.append(f"only {self.grants} grants, expected at least {min_grants}")
        found += [
            f"takeover {takeover.what}: {takeover.length:.2f} s from {takeover.start:.3f} "
            f"(bound {bound:.2f} s + longest stall within {takeover.stall:.2f} s)"
            for takeover in self.takeovers
            if takeover.length > bound + takeover.stall
        ]
        return found

    def problems(self, bound: float, min_grants: int) -> list[str]:
        """Everything wrong with the run; empty when it passed."""
        return self.safety_problems() + self.liveness_problems(bound, min_grants)


def check(history: History) -> Report:
    """Judge one history: safety (overlaps, tokens, stale acts) and liveness (takeovers)."""
    beliefs = all_beliefs(history.calls)
    phantoms = phantom_grants(history.calls, history.faults)
    return Report(
        beliefs=beliefs,
        overlaps=overlaps(beliefs),
        token_violations=token_violations(beliefs),
        stale_acts=stale_acts(beliefs, history.acts),
        takeovers=takeovers(beliefs, history.faults, history.stop, phantoms, history.stalls),
        phantom_grants=phantoms,
    )
