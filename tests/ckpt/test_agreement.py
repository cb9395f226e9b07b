"""Ranks agree on every snapshot (issue 12): the keeper's recorded decisions, driven directly.

These tests call a real :class:`Keeper` (its own shared-memory directory, a real file tier)
from threads standing in for the local ranks, in the interleavings that hung real runs.
"""

from __future__ import annotations

import threading
import time

import pytest

from stalwart.ckpt.agreement import ABANDONED, COMPLETE, LIVE, SKIPPED, Attempt, Ledger
from stalwart.ckpt.keeper import Keeper
from stalwart.ckpt.tiers import parse_tier

SESSION = "run-a"


@pytest.fixture
def keeper(tmp_path):
    shm = tmp_path / "shm"
    k = Keeper(str(shm), [parse_tier(f"file://{tmp_path / 'disk'}")], num_slots=2, linger_s=5)
    k.local_ranks = {0, 1}
    return k


def fill(k: Keeper, steps: tuple[int, int], persisting: int | None = None) -> None:
    """Slot i holds complete step steps[i]; slot ``persisting`` is being written to a tier."""
    for slot, step in zip(k.slots, steps):
        slot.step, slot.complete = step, True
    if persisting is not None:
        k.slots[persisting].persisting = True


def acquire(k: Keeper, rank: int, step: int, must: bool = False, timeout: float = 5.0, session: str = SESSION) -> dict:
    return k.op_acquire({"rank": rank, "step": step, "must": must, "timeout": timeout, "session": session})


def in_thread(fn, *args, **kwargs):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("reply", fn(*args, **kwargs)), daemon=True)
    t.start()
    return t, out


def release(k: Keeper, index: int) -> None:
    with k.cond:
        k.slots[index].persisting = False
        k.cond.notify_all()


def test_a_skip_stays_a_skip_and_a_final_snapshot_opens_an_attempt_every_rank_joins(keeper):
    """The hang of issue 12: rank 1 skipped step 48 and asked for its final snapshot; rank 0's
    late loop request re-skipped the step and rank 1 left with an older step while rank 0
    waited an hour for a step rank 1 would never copy."""
    fill(keeper, (47, 40), persisting=1)
    first = acquire(keeper, 1, 48)
    assert first["slot"] is None and first["state"] == SKIPPED
    t, final1 = in_thread(acquire, keeper, 1, 48, must=True)
    time.sleep(0.3)  # rank 1's final snapshot waits for a slot...
    late = acquire(keeper, 0, 48)  # ...when rank 0's loop request for the same step arrives
    assert late == first, "every rank gets the recorded decision of the loop snapshot"
    assert keeper.cancel == {1}, "the superseded tier copy of step 40 is asked to stop"
    release(keeper, 1)
    t.join(5)
    final0 = acquire(keeper, 0, 48, must=True)
    assert final1["reply"]["slot"] is not None
    assert final0 == final1["reply"] == {"slot": final1["reply"]["slot"], "attempt": 1}


def test_a_final_snapshot_finds_the_loop_snapshot_complete(keeper):
    got = [acquire(keeper, r, 5) for r in (0, 1)]
    assert got[0] == got[1] and got[0]["slot"] is not None
    slot = keeper.slots[got[0]["slot"]]
    slot.complete = True  # what the memory commit does once both copies arrived (no real files here)
    keeper.ledger.finish(keeper.ledger.get(5, 0), COMPLETE)
    assert acquire(keeper, 0, 5, must=True)["complete"] is True
    assert acquire(keeper, 1, 5, must=True)["complete"] is True


def test_an_attempt_a_rank_moved_past_is_abandoned_at_once_naming_the_rank(keeper):
    got = acquire(keeper, 0, 7)
    keeper.slots[got["slot"]].done[0] = {}
    # rank 1 never copied step 7 (say it was skipped for it on another path) and asks for step 8
    acquire(keeper, 1, 8)
    att = keeper.ledger.get(7, 0)
    assert att.state == ABANDONED and "rank 1 moved on to step 8" in att.reason
    reply = keeper.op_wait({"step": 7, "timeout": 30})
    assert reply["done"] is False and "rank 1 moved on to step 8" in reply["error"]


def test_an_attempt_is_abandoned_when_a_rank_leaves_or_disconnects(keeper):
    got = acquire(keeper, 0, 3)
    keeper.slots[got["slot"]].done[0] = {}
    keeper.op_bye({"rank": 1, "clean": True, "step": 2})
    assert keeper.ledger.get(3, 0).state == ABANDONED
    assert "rank 1 left protect() at step 2" in keeper.ledger.get(3, 0).reason
    assert keeper.op_wait({"step": 3, "timeout": 30})["done"] is False

    keeper.op_hello({"rank": 1, "local_ranks": [0, 1]})
    got = acquire(keeper, 0, 4)
    keeper.connected[1] = None
    keeper._disconnected(1)
    assert keeper.ledger.get(4, 0).state == ABANDONED and "rank 1 disconnected" in keeper.ledger.get(4, 0).reason


def test_a_waiting_final_request_ends_when_its_attempt_is_abandoned(keeper):
    got = acquire(keeper, 0, 9, must=True)
    assert got["attempt"] == 1 and keeper.ledger.get(9, 0).state == SKIPPED
    keeper.slots[got["slot"]].done[0] = {}
    t, again = in_thread(acquire, keeper, 0, 9, must=True, timeout=30)  # rank 0 waits for rank 1's copy
    time.sleep(0.3)
    assert t.is_alive()
    acquire(keeper, 1, 10)  # rank 1 went on instead
    t.join(5)
    assert not t.is_alive(), "the wait must end as soon as the attempt cannot complete"
    # the next attempt is opened for rank 0 (rank 1 will never join it: the guard then falls back)
    assert again["reply"]["attempt"] == 2


def test_must_requests_are_bounded_by_their_timeout(keeper):
    fill(keeper, (47, 40), persisting=1)
    keeper.cancel.add(1)  # a copy that does not stop in time
    t0 = time.monotonic()
    reply = acquire(keeper, 0, 48, must=True, timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert reply["slot"] is None and "no snapshot slot became free within" in reply["reason"]


def test_a_new_run_forgets_the_old_runs_decisions(keeper):
    assert acquire(keeper, 0, 3)["slot"] is not None
    keeper.slots[0].done[0] = {}
    fresh = acquire(keeper, 0, 3, session="run-b")
    assert fresh["slot"] is not None and fresh["attempt"] == 0
    assert keeper.ledger.get(3, 0).given == {0}


def test_ledger_rules():
    led = Ledger(keep_steps=4)
    a = led.record(Attempt(1, 0, LIVE, 0))
    with pytest.raises(ValueError):
        led.record(Attempt(1, 0, LIVE, 1))
    led.note(0, 1, 0)
    assert led.blocker(a, {0, 1}, {0}) is None
    led.note(1, 1, 1)
    assert "rank 1 moved on to step 1 (attempt 1)" in led.blocker(a, {0, 1}, {0})
    led.finish(a, ABANDONED, "x")
    led.finish(a, COMPLETE)  # final states stay
    assert a.state == ABANDONED and a.slot is None
    assert led.next_number(1) == 1 and led.reason_for(1) == "step 1 abandoned: x"
    for s in range(2, 10):
        led.record(Attempt(s, 0, SKIPPED))
    assert len(led.attempts) == 4


def test_a_new_plan_does_not_wait_for_a_slot_being_read(keeper):
    """A survivor's first snapshot after a node loss changes the plan while the stand-in still
    reads the old snapshot to rebuild the lost share: the plan is answered at once, the slot
    being read keeps its files and step until released, then is emptied and resized."""
    import os

    from stalwart.formats.manifest import rank_file_name

    def plan(rank: int, size: int, sig: str) -> float:
        t0 = time.monotonic()
        keeper.op_plan({"rank": rank, "file_size": size, "sig": sig, "layout": {}, "session": SESSION, "timeout": 30})
        return time.monotonic() - t0

    for rank in (0, 1):
        plan(rank, 4096, "old")
    fill(keeper, (7, 6))
    read = keeper.slots[0]
    read.pins = 1  # a peer's rebuild reads step 7 from it
    assert plan(0, 8192, "new") < 1.0 and plan(1, 8192, "new") < 1.0
    assert read.step == 7 and read.complete and read.stale, "the slot being read keeps its snapshot"
    assert os.path.getsize(os.path.join(read.dir, rank_file_name(0))) == 4096, "not resized under its reader"
    other = keeper.slots[1]
    assert other.step is None and os.path.getsize(os.path.join(other.dir, rank_file_name(0))) == 8192
    with keeper.cond:
        read.pins = 0
    got = [acquire(keeper, r, 8) for r in (0, 1)]
    assert got[0] == got[1] and got[0]["slot"] is not None
    assert read.step in (None, 8) and not read.stale and not read.complete, "released: emptied at the next acquire"
    assert all(os.path.getsize(os.path.join(read.dir, rank_file_name(r))) == 8192 for r in (0, 1))
