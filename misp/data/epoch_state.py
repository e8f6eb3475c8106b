"""What a checkpoint must hold of the preference data to resume mid-epoch (one part of the datamodule).

Two things: how many batches of the epoch under way were done, and the proposal log q that epoch's
negatives were drawn from (q_phi trains during the epoch, so its state at the epoch's start is kept).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class EpochState:
    """The per-epoch proposal log q and the resume position, saved in and restored from checkpoints."""

    def __init__(self) -> None:
        self.log_q: dict[int, torch.Tensor] = {}
        self.resume: tuple[int, int] | None = None

    def proposal_log_q(self, epoch: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``epoch``'s proposal log q: computed once at its start (``compute``), or as a checkpoint restored it."""
        if epoch not in self.log_q:
            self.log_q = {e: q for e, q in self.log_q.items() if e > epoch - 2}
            self.log_q[epoch] = compute()
        return self.log_q[epoch]

    def resumed_batches(self, epoch: int) -> int:
        """Batches of ``epoch`` done before the checkpoint this run resumed from (0 otherwise; used once).

        Lightning builds the first train dataloader (to count the run's steps for the LR schedule) before
        it restores the loops, and keeps that loader's iterator for the resumed epoch; so the position is
        taken from this state (``load_state_dict`` runs before that), not from the loops.
        """
        if self.resume is None or self.resume[0] != epoch:
            return 0
        done, self.resume = self.resume[1], None
        return done

    def state_dict(self, epoch: int, batches_done: int) -> dict:
        """Where ``epoch`` stands, and the proposal log q its negatives were drawn from."""
        state = {"epoch": epoch, "batches_done": batches_done}
        if epoch in self.log_q:
            state["proposal_log_q"] = self.log_q[epoch]
        return state

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:
            return
        epoch = int(state["epoch"])
        self.resume = (epoch, int(state["batches_done"]))
        if "proposal_log_q" in state:
            self.log_q = {epoch: state["proposal_log_q"]}
