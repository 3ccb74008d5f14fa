"""Batches for step s in Pythia's order: step s = rows [GB·s, GB·(s+1)).

Data-parallel rank r of W takes the contiguous share [GB·s + r·GB/W, +GB/W); micro-batch j of that
share is rows [.. + j·mbs, + mbs). Everything is a pure function of (step, micro-batch, rank), so a
resumed run reads exactly the rows the uninterrupted run would have read (the bug of gpt-neox
PR #308 — a data loader restarting from an offset it had not saved — cannot happen).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatron_l2e.config import DataConfig
from megatron_l2e.data.index import DataError
from megatron_l2e.data.rows import TokenRows

PYTHIA_GLOBAL_BATCH = 1024


class RowSource(Protocol):
    """Anything that yields int64 rows [n, seq_length+1] by position."""

    num_rows: int

    def rows(self, start: int, stop: int) -> torch.Tensor: ...

    def take(self, indices: np.ndarray) -> torch.Tensor: ...


class RowSpan:
    """Rows [offset, offset + count) of another source, renumbered from 0 (e.g. a held-out tail)."""

    def __init__(self, source: RowSource, offset: int, count: int):
        self.source, self.offset, self.num_rows = source, offset, count

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
        return self.source.rows(self.offset + start, self.offset + stop)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.source.take(np.asarray(indices) + self.offset)


class TrainData:
    """Training rows in step order, plus optional held-out rows for validation loss."""

    def __init__(self, train: RowSource, global_batch_size: int, valid: RowSource | None = None,
                 vocab_size: int | None = None):
        self.train, self.valid, self.global_batch_size = train, valid, global_batch_size
        # Every row handed out is checked against the vocabulary (one max over the share each step):
        # the start-up sample (data.check_tokens) cannot see every row, and an id ≥ vocab would end the
        # run mid-step in an IndexError — on a GPU in a device-side assert that kills the whole job.
        self.vocab_size = vocab_size
        self.steps_available = train.num_rows // global_batch_size
        self._share_key: tuple[int, int, int, int] | None = None   # (step, rank, world, mbs) read last
        self._share_chunks: tuple[torch.Tensor, ...] = ()          # its micro-batches, views of one block

    def _share(self, micro_index: int, micro_batch_size: int, dp_rank: int, dp_world: int) -> int:
        """Row offset of micro-batch j of rank r inside a step (checks the split is exact)."""
        gb = self.global_batch_size
        if dp_world < 1 or gb % dp_world:
            raise ValueError(f"data-parallel size {dp_world} does not divide the global batch {gb}")
        share = gb // dp_world
        if micro_batch_size < 1 or share % micro_batch_size:
            raise ValueError(f"micro-batch {micro_batch_size} does not divide the per-rank share {share}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world})")
        if not 0 <= micro_index < share // micro_batch_size:
            raise ValueError(f"micro_index {micro_index} outside [0, {share // micro_batch_size})")
        return dp_rank * share + micro_index * micro_batch_size

    def micro_batch(self, step: int, micro_index: int, micro_batch_size: int, dp_rank: int,
                    dp_world: int) -> torch.Tensor:
        """int64 [micro_batch_size, seq_length+1]; inputs = row[:-1], labels = row[1:].

        The first micro-batch asked for a (step, rank) reads the rank's whole share in one slice;
        the others are disjoint row views of it (per-call reads would cost more in Python and
        allocation than the copy itself). Callers may modify a micro-batch: views do not overlap.
        After the share's last micro-batch nothing is kept, so no memory is held between steps.
        """
        key = (step, dp_rank, dp_world, micro_batch_size)
        if self._share_key != key:   # first micro-batch of this rank's step: read the whole share
            if not 0 <= step < self.steps_available:
                raise IndexError(f"step {step} outside the {self.steps_available} steps the data covers")
            self._share(0, micro_batch_size, dp_rank, dp_world)   # validates the split
            self._share_chunks = ()   # free the previous step's block before reading the next
            share = self.global_batch_size // dp_world
            start = step * self.global_batch_size + dp_rank * share
            # [share, seq_length+1] int64, split into share/mbs row views in one call
            block = self.train.rows(start, start + share)
            if self.vocab_size is not None:
                self._check_ids(block, start, step, dp_rank)
            self._share_chunks = block.split(micro_batch_size)
            self._share_key = key
        chunks = self._share_chunks
        if not 0 <= micro_index < len(chunks):
            raise ValueError(f"micro_index {micro_index} outside [0, {len(chunks)})")
        if micro_index == len(chunks) - 1:   # last micro-batch handed out: keep nothing between steps
            self._share_key, self._share_chunks = None, ()
        return chunks[micro_index]

    def _check_ids(self, block: torch.Tensor, first_row: int, step: int, dp_rank: int) -> None:
        top = int(block.max())
        if top < self.vocab_size:
            return
        bad = int((block >= self.vocab_size).any(dim=1).nonzero()[0])
        row, tok = first_row + bad, int(block[bad].max())
        name = getattr(self.train, "bin_path", None) or getattr(self.train, "name", "the training data")
        raise DataError(f"{name}: row {row} (step {step + 1}, data-parallel rank {dp_rank}) holds token id {tok}, "
                        f"≥ model.vocab_size {self.vocab_size}: re-tokenize with the model's tokenizer, or raise "
                        f"model.vocab_size")

    def valid_micro_batch(self, index: int, micro_batch_size: int, dp_rank: int,
                          dp_world: int) -> torch.Tensor | None:
        """Held-out rows for validation iteration ``index`` (wrapping around), or None without any.

        Iteration i reads the W·mbs rows from (i·W·mbs) mod n_valid; rank r takes its mbs rows.
        """
        if self.valid is None or self.valid.num_rows == 0:
            return None
        n = self.valid.num_rows
        start = ((index * dp_world + dp_rank) * micro_batch_size) % n
        if start + micro_batch_size <= n:
            return self.valid.rows(start, start + micro_batch_size)
        return self.valid.take((start + np.arange(micro_batch_size)) % n)


# ----------------------------------------------------------------------------------------------
def build_train_data(cfg: DataConfig, *, seq_length: int, global_batch_size: int, vocab_size: int,
                     iters: int, seed: int, valid_samples: int | None = None) -> TrainData:
    """Open (and validate) the configured data; DataError names the file and the problem.

    ``rows`` / ``pythia_preshuffled``: rows in file order (``seed`` unused: the order *is* the data).
    Validation rows: ``data.valid_path`` if set, else the rows after the run's last step (if any).
    ``data.smoke``: builds the smoke corpus (cached) into the folder of ``data.path`` first.
    ``documents``: megatron-core GPTDataset samples (``seed`` shuffles; ``data.split`` holds out the
    validation share, ``valid_samples`` of it — default one epoch, 1024 for a weighted blend).
    """
    if cfg.format == "pythia_preshuffled" and global_batch_size != PYTHIA_GLOBAL_BATCH:
        raise DataError(f"data.format pythia_preshuffled replays Pythia's batches and needs "
                        f"train.global_batch_size {PYTHIA_GLOBAL_BATCH}, got {global_batch_size}")
    if cfg.format == "documents":
        from megatron_l2e.data.documents import DocumentRows, build_document_datasets
        train_ds, valid_ds = build_document_datasets(cfg, seq_length=seq_length, vocab_size=vocab_size, seed=seed,
                                                     train_samples=iters * global_batch_size,
                                                     valid_samples=valid_samples)
        train_docs = DocumentRows(train_ds, seq_length)
        check_steps(train_docs.num_rows, global_batch_size, iters, (list(cfg.paths) or [cfg.path])[0] + ".bin")
        return TrainData(train_docs, global_batch_size, DocumentRows(valid_ds, seq_length) if valid_ds else None,
                         vocab_size=vocab_size)
    path, valid_path = cfg.path, cfg.valid_path
    if cfg.smoke:
        from megatron_l2e.data.smoke import build_smoke_data
        smoke = build_smoke_data(Path(cfg.path).parent, vocab_size=vocab_size, seq_length=seq_length,
                                 max_files=cfg.smoke_max_files)
        path, valid_path = smoke.prefix, valid_path or smoke.valid_prefix
    train = TokenRows(path, seq_length, vocab_size=vocab_size, check_tokens=cfg.check_tokens)
    check_steps(train.num_rows, global_batch_size, iters, train.bin_path)
    if valid_path:
        valid: RowSource | None = TokenRows(valid_path, seq_length, vocab_size=vocab_size,
                                            check_tokens=cfg.check_tokens)
    else:
        used = iters * global_batch_size
        valid = RowSpan(train, used, train.num_rows - used) if train.num_rows > used else None
    return TrainData(train, global_batch_size, valid, vocab_size=vocab_size)


def check_steps(num_rows: int, global_batch_size: int, iters: int, name: str) -> None:
    steps = num_rows // global_batch_size
    if steps < iters:
        raise DataError(f"{name}: {num_rows} rows of global batch {global_batch_size} cover {steps} steps, "
                        f"the run needs {iters} (train.iters)")


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` → normalised [train, valid, test] shares; DataError on anything else."""
    try:
        parts = [float(x) for x in split.split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(x < 0 for x in parts) or sum(parts) <= 0 or parts[0] <= 0:
        raise DataError(f"data.split: expected up to three non-negative weights 'train,valid,test' with a "
                        f"positive train share, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    return [x / sum(parts) for x in parts]
