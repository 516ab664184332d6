"""The checker itself, on hand-made histories: it must catch violations, and pass clean runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.history import (
    ACQUIRE,
    KEEP_ALIVE,
    RELEASE,
    Act,
    Belief,
    Call,
    FaultWindow,
    History,
    Recorder,
    Stall,
    Takeover,
    check,
    client_beliefs,
    read_events,
)

pytestmark = pytest.mark.faults

TTL = 1.0


def grant(client: str, token: int, send: float, recv: float | None = None) -> Call:
    recv = send + 0.01 if recv is None else recv
    return Call(client, ACQUIRE, send, recv, True, granted=True, token=token, ttl=TTL)


def refused(client: str, send: float) -> Call:
    return Call(client, ACQUIRE, send, send + 0.01, True, granted=False)


def renew(client: str, token: int, send: float, recv: float | None = None) -> Call:
    recv = send + 0.01 if recv is None else recv
    return Call(client, KEEP_ALIVE, send, recv, True, granted=True, token=token, ttl=TTL)


def release(client: str, token: int, send: float, ok: bool = True) -> Call:
    code = "OK" if ok else "UNAVAILABLE"
    return Call(client, RELEASE, send, send + 0.01, ok, code=code, granted=ok, token=token)


def failed(client: str, op: str, send: float, recv: float) -> Call:
    return Call(client, op, send, recv, False, code="DEADLINE_EXCEEDED")


def spans(takeovers: list[Takeover]) -> list[tuple[float, float]]:
    return [(round(t.start, 6), round(t.end, 6)) for t in takeovers]


def history(
    *calls: Call,
    stop: float = 10.0,
    faults: tuple[FaultWindow, ...] = (),
    stalls: tuple[Stall, ...] = (),
) -> History:
    return History(stop, calls=list(calls), faults=list(faults), stalls=list(stalls))


def test_a_clean_handoff_passes() -> None:
    report = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.3),
            release("a", 10, 0.5),
            refused("b", 0.2),
            grant("b", 11, 0.55),
            release("b", 11, 1.0),
            grant("a", 12, 1.1),
            stop=1.5,
        )
    )
    assert report.problems(bound=1.5, min_grants=3) == []
    assert report.grants == 3
    assert [belief.token for belief in report.beliefs] == [10, 11, 12]
    assert report.summary("memory", "none", 1.5).startswith(
        "FAULT memory none: grants=3 overlaps=0 token_regressions=0 max_takeover="
    )


def test_an_overlap_fails() -> None:
    # b is granted while a still believes (a's renewal was sent at 0.5: it believes until 1.5).
    report = check(history(grant("a", 10, 0.0), renew("a", 10, 0.5), grant("b", 11, 1.2)))
    assert len(report.overlaps) == 1
    first, second = report.overlaps[0]
    assert (first.client, second.client) == ("a", "b")
    assert report.problems(bound=5.0, min_grants=1)


def test_a_token_regression_fails() -> None:
    report = check(history(grant("a", 10, 0.0), release("a", 10, 0.2), grant("b", 9, 0.3)))
    assert report.overlaps == []
    assert len(report.token_violations) == 1
    assert "below 10" in report.token_violations[0]


def test_a_repeated_token_fails_also_for_another_client() -> None:
    report = check(history(grant("a", 10, 0.0), release("a", 10, 0.2), grant("b", 10, 0.3)))
    assert report.token_violations == ["token 10 granted again, to b at 0.310"]


def test_a_token_coming_back_after_another_fails() -> None:
    report = check(
        history(
            grant("a", 10, 0.0),
            release("a", 10, 0.2),
            grant("b", 11, 0.3),
            release("b", 11, 0.5),
            grant("a", 10, 0.6),
        )
    )
    assert report.token_violations == ["token 10 granted again, to a at 0.610"]


def test_a_lapsed_belief_confirmed_again_with_its_token_is_one_grant() -> None:
    # a's belief lapsed at 1.0 without an answer; its next acquire refreshes the same lease.
    report = check(
        history(grant("a", 10, 0.0), failed("a", KEEP_ALIVE, 0.3, 0.8), grant("a", 10, 1.2))
    )
    assert report.token_violations == []
    assert report.grants == 1
    assert [(b.start, b.end) for b in report.beliefs] == [(0.01, 1.0), (1.21, 2.2)]


def test_a_failed_call_never_extends_a_belief() -> None:
    beliefs = client_beliefs(
        [grant("a", 10, 0.0), failed("a", KEEP_ALIVE, 0.3, 0.8), failed("a", KEEP_ALIVE, 0.8, 1.3)]
    )
    assert beliefs == [Belief("a", 10, 0.01, 1.0)]


def test_an_answer_after_the_deadline_never_revives_a_belief() -> None:
    # The renewal was sent in time but answered after the belief had run out.
    beliefs = client_beliefs([grant("a", 10, 0.0), renew("a", 10, 0.9, recv=1.05)])
    assert beliefs == [Belief("a", 10, 0.01, 1.0)]
    # A grant answered after its own send time + ttl is never believed at all.
    assert client_beliefs([grant("a", 10, 0.0, recv=1.2)]) == []


def test_a_grant_the_service_held_back_counts_from_send_plus_waited() -> None:
    held = Call("a", ACQUIRE, 0.0, 2.0, True, granted=True, token=10, ttl=TTL, waited=1.9)
    assert client_beliefs([held]) == [Belief("a", 10, 2.0, 2.9)]


def test_a_grant_answered_too_late_is_a_phantom() -> None:
    late = grant("a", 10, 0.0, recv=1.2)
    report = check(history(late, grant("b", 11, 1.3)))
    assert report.phantom_grants == [late]
    assert [belief.client for belief in report.beliefs] == ["b"]


def test_a_renewal_counts_from_its_send_time() -> None:
    beliefs = client_beliefs([grant("a", 10, 0.0), renew("a", 10, 0.5, recv=0.9)])
    assert beliefs == [Belief("a", 10, 0.01, 1.5)]


def test_a_release_ends_the_belief_when_sent_even_unanswered() -> None:
    beliefs = client_beliefs([grant("a", 10, 0.0), release("a", 10, 0.4, ok=False)])
    assert beliefs == [Belief("a", 10, 0.01, 0.4)]
    # A release naming another lease leaves this one believed.
    assert client_beliefs([grant("a", 10, 0.0), release("a", 9, 0.4)]) == [
        Belief("a", 10, 0.01, 1.0)
    ]


def test_a_refused_or_foreign_renewal_does_not_extend_the_belief_nor_end_it() -> None:
    refusal = Call("a", KEEP_ALIVE, 0.3, 0.35, True, granted=False, ttl=-1.0)
    assert client_beliefs([grant("a", 10, 0.0), refusal]) == [Belief("a", 10, 0.01, 1.0)]
    assert client_beliefs([grant("a", 10, 0.0), renew("a", 11, 0.3)]) == [
        Belief("a", 10, 0.01, 1.0)
    ]


def test_a_new_grant_ends_the_clients_belief_in_an_older_one() -> None:
    assert client_beliefs([grant("a", 10, 0.0), grant("a", 12, 0.5)]) == [
        Belief("a", 10, 0.01, 0.51),
        Belief("a", 12, 0.51, 1.5),
    ]


def test_an_act_outside_the_belief_is_stale() -> None:
    report = check(
        History(
            5.0,
            calls=[grant("a", 10, 0.0)],
            acts=[Act("a", 10, 0.5), Act("a", 10, 1.2), Act("a", 11, 0.6), Act("b", 10, 0.7)],
        )
    )
    assert report.stale_acts == [Act("a", 10, 1.2), Act("a", 11, 0.6), Act("b", 10, 0.7)]


def test_a_stale_unchecked_act_is_told_apart() -> None:
    entry = Act("a", 10, 1.5, checked=False)
    report = check(History(5.0, calls=[grant("a", 10, 0.0)], acts=[entry, Act("a", 10, 0.5)]))
    assert report.stale_entries == [entry]
    assert report.safety_problems() == []


def test_takeover_counts_gaps_and_the_gap_still_open_at_the_end() -> None:
    report = check(history(grant("a", 10, 0.0), grant("b", 11, 1.5), stop=4.0))
    assert spans(report.takeovers) == ([(1.0, 1.51), (2.5, 4.0)])
    assert report.max_takeover is not None and report.max_takeover.length == pytest.approx(1.5)
    assert "takeover nobody by the end: 1.50 s" in report.problems(bound=1.0, min_grants=2)[0]


def test_takeover_counts_from_the_end_of_a_blocking_fault() -> None:
    outage = FaultWindow("restart", start=0.5, end=3.0, blocking=True)
    report = check(history(grant("a", 10, 0.0), grant("b", 11, 3.4), stop=4.0, faults=(outage,)))
    assert spans(report.takeovers) == ([(3.0, 3.41)])


def test_takeover_after_a_fault_counts_from_its_start_to_another_client() -> None:
    pause = FaultWindow("pause", start=0.5, end=3.0, victims=("a",))
    report = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.4),
            grant("b", 11, 1.5),
            stop=2.0,
            faults=(pause,),
        )
    )
    after = [t for t in report.takeovers if t.what == "after pause"]
    assert spans(after) == ([(0.5, 1.51)])


def test_a_victim_leading_again_after_the_fault_healed_ends_the_takeover() -> None:
    pause = FaultWindow("pause", start=0.5, end=1.8, victims=("a",))
    back = history(grant("a", 10, 0.0), grant("a", 11, 1.9), stop=2.5, faults=(pause,))
    after = [t for t in check(back).takeovers if t.what == "after pause"]
    assert spans(after) == [(0.5, 1.91)]
    # A victim's belief during the fault is not a takeover: counted to the end.
    during = history(grant("a", 10, 0.0), grant("a", 11, 1.0), stop=2.5, faults=(pause,))
    after = [t for t in check(during).takeovers if t.what == "after pause"]
    assert spans(after) == [(0.5, 2.5)]


def test_a_phantom_grant_is_a_holder_that_disappeared_when_granted() -> None:
    """The paused holder's waiting client got the lock while paused: the takeover by
    another client counts from that grant, the earliest it can have been made."""
    pause = FaultWindow("pause", start=0.5, end=3.0, victims=("a", "c"))
    parked = Call("c", ACQUIRE, 0.2, 3.1, True, granted=True, token=11, ttl=TTL, waited=1.2)
    report = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.4),
            parked,
            grant("b", 12, 2.5),
            stop=3.2,
            faults=(pause,),
        )
    )
    assert report.phantom_grants == [parked]
    after = [t for t in report.takeovers if t.what == "after pause"]
    assert spans(after) == ([(1.4, 2.51)])
    assert not report.liveness_problems(bound=1.5, min_grants=2)


def test_a_grant_that_reaches_a_paused_client_in_time_is_a_phantom_all_the_same() -> None:
    """c's waiting acquire is granted at 1.1 while a fault has c paused; the answer
    reaches c at 2.05, as the fault heals and inside the lease (so not too late), but c
    was gone when the service granted it: the takeover counts from that grant, as for a
    late one."""
    pause = FaultWindow("pause", start=0.5, end=2.0, victims=("a", "c"))
    parked = Call("c", ACQUIRE, 0.3, 2.05, True, granted=True, token=11, ttl=TTL, waited=0.8)
    report = check(
        history(grant("a", 10, 0.0), parked, grant("b", 12, 2.15), stop=2.5, faults=(pause,))
    )
    assert report.phantom_grants == [parked]
    after = [t for t in report.takeovers if t.what == "after pause"]
    assert spans(after) == [(1.1, 2.05)]
    assert not report.liveness_problems(bound=1.5, min_grants=2)


def slow_takeover(*stalls: Stall) -> History:
    """a's belief ends at 1.0, b leads from 2.61: a gap of 1.61 s, over a 1.5 s bound."""
    return history(grant("a", 10, 0.0), grant("b", 11, 2.6), stop=2.8, stalls=stalls)


def test_a_takeover_slower_than_the_bound_without_a_stall_fails() -> None:
    report = check(slow_takeover(Stall("clients-0", 1.2, 1.205)))  # too short to matter
    (problem,) = report.liveness_problems(bound=1.5, min_grants=2)
    assert problem == (
        "takeover b after a gap: 1.61 s from 1.000 (bound 1.50 s + longest stall within 0.01 s)"
    )


def test_the_same_takeover_with_a_matching_stall_passes() -> None:
    """The machine was loaded: a probed process could not run for 0.2 s within the gap."""
    report = check(slow_takeover(Stall("clients-1", 1.5, 1.7, ("b",))))
    assert [round(t.stall, 6) for t in report.takeovers] == [0.2]
    assert report.liveness_problems(bound=1.5, min_grants=2) == []
    assert report.summary("memory", "none", 1.5).endswith(
        "max_takeover=1.61s (bound 1.50s + stall 0.20s)"
    )


def test_only_the_part_of_a_stall_within_the_takeover_counts() -> None:
    # 0.5 s stalled, but only 0.05 s of it after a's belief ended: not enough.
    report = check(slow_takeover(Stall("test", 0.55, 1.05), Stall("clients-0", 2.61, 3.0)))
    assert [round(t.stall, 6) for t in report.takeovers] == [0.05]
    assert report.liveness_problems(bound=1.5, min_grants=2)


def test_a_stall_of_a_process_the_fault_paused_does_not_count() -> None:
    """SIGSTOP is the fault, not load: the paused process's stall extends no bound."""
    pause = FaultWindow("pause", start=0.5, end=3.0, victims=("a",))
    paused = Stall("clients-0", 0.55, 3.0, ("a",))
    report = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.4),
            grant("b", 11, 2.5),
            stop=2.8,
            faults=(pause,),
            stalls=(paused,),
        )
    )
    assert [t.stall for t in report.takeovers] == [0.0, 0.0]
    assert len(report.liveness_problems(bound=1.5, min_grants=2)) == 1
    # Another process's stall in that window counts.
    loaded = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.4),
            grant("b", 11, 2.5),
            stop=2.8,
            faults=(pause,),
            stalls=(paused, Stall("clients-1", 1.0, 1.6, ("b",))),
        )
    )
    assert loaded.liveness_problems(bound=1.5, min_grants=2) == []


def test_a_stall_never_excuses_an_overlap() -> None:
    report = check(
        history(
            grant("a", 10, 0.0),
            renew("a", 10, 0.5),
            grant("b", 11, 1.2),
            stalls=(Stall("clients-0", 0.0, 5.0),),
        )
    )
    assert len(report.safety_problems()) == 1


def test_recorded_events_read_back(tmp_path: Path) -> None:
    events = [
        grant("a", 10, 0.0),
        Act("a", 10, 0.2),
        FaultWindow("pause", 1.0, 2.0, victims=("a",)),
        Stall("clients-0", 1.2, 1.3, ("a", "b")),
    ]
    recorder = Recorder(tmp_path / "events.jsonl")
    for event in events:
        recorder.record(event)
    recorder.close()
    with (tmp_path / "events.jsonl").open("a") as file:
        file.write('{"kind": "call", "cli')  # a writer killed mid-line
    assert list(read_events(tmp_path / "events.jsonl")) == events
