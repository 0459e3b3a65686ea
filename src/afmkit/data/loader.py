"""A deterministic, resumable, sharded loader of packed rows.

Batch ``s`` of the run is the global rows ``s*B .. s*B+B-1`` of an endless sequence of epochs,
each epoch a permutation of all packed rows drawn from ``(seed, epoch)``. So the batches depend
only on the seed, the data and the step, never on how often the run was stopped: the loader's
whole state is the step, saved in every checkpoint. With several processes, each one packs only
the rows of the global batch that its devices hold (``positions``; see
``train.step.local_batch_positions``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from afmkit.data.packing import TokenStream, num_rows, pack_rows
from afmkit.errors import UserError


@dataclasses.dataclass
class PackedLoader:
    stream: TokenStream
    seq_len: int
    global_batch: int
    seed: int
    step: int = 0
    _perm_cache: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.global_batch < 1:
            raise UserError("sequence length and batch size must be positive")
        self.rows = num_rows(self.stream, seq_len=self.seq_len)
        if self.rows == 0:
            raise UserError(
                f"the corpus has {len(self.stream.tokens)} tokens, fewer than one row of {self.seq_len + 1}; "
                "add data or lower --seq-len"
            )

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache.clear()
            self._perm_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._perm_cache[epoch]

    def row_indices(self, step: int, positions: np.ndarray | None = None) -> np.ndarray:
        """Packed-row indices of batch ``step`` at ``positions`` within it (default: all)."""
        positions = np.arange(self.global_batch) if positions is None else np.asarray(positions)
        out = np.empty(len(positions), np.int64)
        for i, position in enumerate(positions):
            epoch, offset = divmod(step * self.global_batch + int(position), self.rows)
            out[i] = self._permutation(epoch)[offset]
        return out

    def next_batch(self, positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The next batch's fields (only the rows at ``positions``), advancing the loader."""
        batch = pack_rows(self.stream, self.row_indices(self.step, positions), seq_len=self.seq_len)
        self.step += 1
        return batch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_batch()

    def epoch(self) -> float:
        return self.step * self.global_batch / self.rows

    # -- checkpointing -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "fingerprint": self.stream.fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved ``state()``; a different seed, shape or corpus is an error."""
        for key in ("seed", "seq_len", "global_batch", "fingerprint"):
            mine = self.state()[key]
            if state.get(key) != mine:
                raise UserError(
                    f"the checkpoint's data loader had {key}={state.get(key)!r} but this run has {mine!r}; "
                    "resume with the same data, tokenizer, --seed, --batch and --seq-len"
                )
        self.step = int(state["step"])
