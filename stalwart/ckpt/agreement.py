"""How the ranks of a node agree on every snapshot: one recorded decision per attempt.

A snapshot is identified by ``(step, attempt)``. Attempt 0 is the training loop's
snapshot (``guard.step()``); a *must* snapshot (the final one at exit, ``save_now()``,
preemption) of a step whose earlier attempts did not complete is attempt 1, 2, ...
The keeper decides each attempt **once**, when the first local rank asks, and records
the decision (a slot, or skipped with a reason); every other rank asking for the same
attempt gets the recorded answer. A decision is never changed afterwards: a must
snapshot does not revive a skipped attempt, it opens the next one, which every rank
then joins. So a multi-rank attempt is either filled by every rank or abandoned by all.

An attempt that is still being filled is abandoned as soon as it can no longer
complete - a rank that has not delivered its copy has moved on to a later decision,
left, or disconnected - and the reason names that rank, so nobody waits for it.

This module is pure bookkeeping (no I/O, no locks): the keeper calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LIVE, COMPLETE, SKIPPED, ABANDONED = "live", "complete", "skipped", "abandoned"


@dataclass
class Attempt:
    """One decision: snapshot ``step`` (attempt ``number``) goes to ``slot``, or not."""

    step: int
    number: int
    state: str = LIVE
    slot: int | None = None
    reason: str | None = None
    given: set[int] = field(default_factory=set)  # local ranks that were handed the slot

    @property
    def key(self) -> tuple[int, int]:
        return (self.step, self.number)

    def describe(self) -> str:
        name = f"step {self.step}" + (f" (attempt {self.number})" if self.number else "")
        return f"{name} {self.state}" + (f": {self.reason}" if self.reason else "")


class Ledger:
    """Every snapshot decision of the current run on one node, and each rank's progress.

    ``progress[rank]`` is the newest ``(step, attempt)`` the rank was given a decision
    for; ranks only move forward within a run, so an unfinished attempt that a rank has
    gone past without delivering its copy can never complete.
    """

    def __init__(self, keep_steps: int = 256) -> None:
        self.keep_steps = keep_steps
        self.session: str | None = None
        self.attempts: dict[int, list[Attempt]] = {}
        self.progress: dict[int, tuple[int, int]] = {}
        self.gone: dict[int, str] = {}  # rank -> why no more copies will come from it

    # ------------------------------------------------------------------ runs and ranks
    def start_session(self, session: str | None) -> bool:
        """Forget every decision of an earlier run (trainers restarted); True if it changed."""
        if session is None or session == self.session:
            return False
        self.session = session
        self.attempts.clear()
        self.progress.clear()
        self.gone.clear()
        return True

    def rank_joined(self, rank: int) -> None:
        """A (new) process of ``rank`` connected: its earlier progress is not its own."""
        self.progress.pop(rank, None)
        self.gone.pop(rank, None)

    def rank_left(self, rank: int, why: str) -> None:
        self.gone[rank] = why

    def note(self, rank: int, step: int, number: int) -> None:
        self.progress[rank] = max(self.progress.get(rank, (step, number)), (step, number))

    # ------------------------------------------------------------------ decisions
    def get(self, step: int, number: int) -> Attempt | None:
        for a in self.attempts.get(step, ()):
            if a.number == number:
                return a
        return None

    def of_step(self, step: int) -> list[Attempt]:
        return list(self.attempts.get(step, ()))

    def live(self, step: int) -> Attempt | None:
        return next((a for a in self.attempts.get(step, ()) if a.state == LIVE), None)

    def complete(self, step: int) -> Attempt | None:
        return next((a for a in self.attempts.get(step, ()) if a.state == COMPLETE), None)

    def next_number(self, step: int) -> int:
        """The number of a new must attempt of ``step`` (0 stays the loop's)."""
        return max((a.number for a in self.attempts.get(step, ())), default=0) + 1

    def record(self, attempt: Attempt) -> Attempt:
        if self.get(attempt.step, attempt.number) is not None:
            raise ValueError(f"{attempt.describe()} was already decided")
        self.attempts.setdefault(attempt.step, []).append(attempt)
        if len(self.attempts) > self.keep_steps:
            for step in sorted(self.attempts)[: len(self.attempts) - self.keep_steps]:
                if all(a.state != LIVE for a in self.attempts[step]):
                    del self.attempts[step]
        return attempt

    def finish(self, attempt: Attempt | None, state: str, reason: str | None = None) -> None:
        """Move a live attempt to ``state`` (complete or abandoned); final states stay."""
        if attempt is None or attempt.state != LIVE:
            return
        attempt.state = state
        attempt.reason = reason
        if state != COMPLETE:
            attempt.slot = None

    def blocker(self, attempt: Attempt, expected: set[int], delivered: set[int]) -> str | None:
        """Why ``attempt`` can never complete (a rank that owes its copy moved on or left), or None."""
        for rank in sorted(expected - delivered):
            if rank in self.gone:
                return f"rank {rank} {self.gone[rank]} without delivering its copy"
            step, number = self.progress.get(rank, (-1, 0))
            if (step, number) > attempt.key:
                where = f"step {step}" + (f" (attempt {number})" if number else "")
                return f"rank {rank} moved on to {where} without delivering its copy"
        return None

    def reason_for(self, step: int) -> str | None:
        """Why no attempt of ``step`` is complete or live (the newest attempt's reason)."""
        attempts = self.attempts.get(step)
        if not attempts or any(a.state in (LIVE, COMPLETE) for a in attempts):
            return None
        last = attempts[-1]
        return last.describe()
