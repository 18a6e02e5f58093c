"""Check a run of stored events against their hashes and signed checkpoints."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field

from moorage.audit.checkpoints import Checkpoint, CheckpointVerifier
from moorage.audit.events import StoredEvent, event_hash


@dataclass
class Verification:
    """The outcome: `problem` names the first bad event, or is None."""

    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    problem: str | None = None
    bad_seq: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class ChainChecker:
    """Feed events in stored order; the first problem found is kept."""

    def __init__(
        self, anchor_seq: int, anchor_hash: str, keep: set[int] | None = None
    ) -> None:
        self.result = Verification()
        self._seq = anchor_seq
        self._hash = anchor_hash
        # Hashes of the events that checkpoints name, kept for check_checkpoints.
        self._keep = keep if keep is not None else set()
        self._hashes: dict[int, str] = {}
        self._signed_up_to: int | None = None

    def add(self, stored: StoredEvent) -> bool:
        """Check one event; return False once a problem has been found."""
        if self.result.problem is not None:
            return False
        problem = self._problem(stored)
        if problem is not None:
            self.result.problem = problem
            self.result.bad_seq = min(stored.seq, self._seq + 1)
            return False
        if self.result.first_seq is None:
            self.result.first_seq = stored.seq
        self.result.events += 1
        self.result.last_seq = stored.seq
        self._seq, self._hash = stored.seq, stored.hash
        if stored.seq in self._keep:
            self._hashes[stored.seq] = stored.hash
        return True

    def _problem(self, stored: StoredEvent) -> str | None:
        expected = self._seq + 1
        if stored.seq > expected:
            return f"event {expected} is missing: the next stored event is {stored.seq}"
        if stored.seq < expected:
            return f"event {stored.seq} is out of order: expected event {expected}"
        if event_hash(stored.seq, stored.event, stored.prev_hash) != stored.hash:
            return f"event {stored.seq} was altered: its hash does not match its fields"
        if stored.prev_hash != self._hash:
            return (
                f"event {stored.seq} does not follow event {self._seq}: an event was "
                "removed, inserted or moved"
            )
        return None

    @property
    def signed_up_to(self) -> int | None:
        """The newest event that a valid checkpoint matched, once checked."""
        return self._signed_up_to

    def finish(self, head: tuple[int, str] | None) -> Verification:
        """Compare the end of the chain with the recorded head, if there is one."""
        if self.result.problem is None and head is not None:
            head_seq, head_hash = head
            if head_seq > self._seq:
                self.result.problem = (
                    f"event {self._seq + 1} is missing: the log ends at event "
                    f"{self._seq} but its head records event {head_seq}"
                )
                self.result.bad_seq = self._seq + 1
            elif head_seq == self._seq and head_hash != self._hash:
                self.result.problem = (
                    f"event {self._seq} does not match the hash its head records"
                )
                self.result.bad_seq = self._seq
        return self.result

    def check_checkpoints(
        self, checkpoints: Iterable[Checkpoint], verifier: CheckpointVerifier
    ) -> None:
        """Check each checkpoint's signature and that it matches the events seen."""
        for checkpoint in checkpoints:
            if self.result.problem is not None:
                return
            seen = self._hashes.get(checkpoint.seq)
            if seen is None and checkpoint.seq > self._seq:
                self._check_past_end(checkpoint, verifier)
                continue
            if seen is None:
                continue  # an archived event, or one outside an export's range
            error = verifier.check(checkpoint)
            if error is not None:
                self.result.problem = f"checkpoint at event {checkpoint.seq}: {error}"
                self.result.bad_seq = checkpoint.seq
            elif seen != checkpoint.hash:
                self.result.problem = (
                    f"event {checkpoint.seq} differs from its signed checkpoint of "
                    f"{checkpoint.time:%Y-%m-%d %H:%M:%S} UTC"
                )
                self.result.bad_seq = checkpoint.seq
            else:
                self.result.checkpoints += 1
                self._signed_up_to = max(self._signed_up_to or 0, checkpoint.seq)
        last_signed = self._signed_up_to
        if self.result.problem is None and self.result.last_seq is not None:
            if last_signed is None:
                self.result.warnings.append("no signed checkpoint covers these events")
            elif last_signed < self.result.last_seq:
                self.result.warnings.append(
                    f"events after {last_signed} are not yet covered by a signed "
                    "checkpoint"
                )

    def _check_past_end(
        self, checkpoint: Checkpoint, verifier: CheckpointVerifier
    ) -> None:
        """Fail on a checkpoint that names an event after the end of the log.

        The checkpoints are read before the events, so a live server cannot
        sign one past the events read. A valid signature there means that
        events were cut off the end of the log and its head row rewritten.
        """
        error = verifier.check(checkpoint)
        if error is not None:
            self.result.problem = f"checkpoint at event {checkpoint.seq}: {error}"
        else:
            self.result.problem = (
                f"checkpoint at event {checkpoint.seq} names an event past the end "
                f"of the log (event {self._seq}): events were removed from its end"
            )
        self.result.bad_seq = self._seq + 1


async def check_stream(
    checker: ChainChecker, events: AsyncIterable[StoredEvent]
) -> None:
    async for stored in events:
        if not checker.add(stored):
            return
