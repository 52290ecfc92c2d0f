"""Training samples from the slice store: foreground oversampling and two sources.

The :class:`SliceSampler` decides *which* (case, slice) pairs form a batch, from the
store's per-slice label counts, with one numpy generator. Both sources consume it, so
they draw from the same distribution:

- :class:`ResidentSource` holds every train slice in one device tensor and gathers
  2.5D stacks by index (no DataLoader, no workers);
- :class:`StreamingSource` reads 2.5D samples from Zarr in background threads into
  pinned memory, a few batches ahead.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from storage import CaseReader, SliceStore
from storage.reader import window_indices


def volume_batches(
    image: np.ndarray, context: int, device: torch.device, batch: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, stacks)`` over a (Z, Y, X) volume: (B, context, Y, X) 2.5D inputs of
    slices ``start .. start + B``, edges replicated (the training input, for inference)."""
    depth = image.shape[0]
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).to(device)
    for start in range(0, depth, batch):
        zs = range(start, min(start + batch, depth))
        index = torch.from_numpy(np.stack([window_indices(z, context, depth) for z in zs]))
        yield start, volume[index.to(device)]


__all__ = [
    "ResidentSource",
    "SliceSampler",
    "SliceTable",
    "StreamingSource",
    "decode_scale",
    "volume_batches",
]


@dataclass(frozen=True)
class SliceTable:
    """Every slice of a set of cases: case index, slice index and what it contains."""

    case_ids: tuple[str, ...]
    case: np.ndarray  # (N,) int32 index into case_ids
    z: np.ndarray  # (N,) int32
    depth: np.ndarray  # (N,) int32 slices in that case
    liver: np.ndarray  # (N,) bool: any label >= 1
    tumour: np.ndarray  # (N,) bool: any label == 2

    @classmethod
    def from_store(cls, store: SliceStore, case_ids: list[str]) -> SliceTable:
        parts = []
        for i, case_id in enumerate(case_ids):
            counts = store.case(case_id).meta.slice_counts
            liver, tumour = np.asarray(counts["liver"]), np.asarray(counts["tumour"])
            n = len(liver)
            parts.append(
                (np.full(n, i), np.arange(n), np.full(n, n), (liver + tumour) > 0, tumour > 0)
            )
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [np.zeros(0)] * 5
        return cls(
            tuple(case_ids),
            cols[0].astype(np.int32),
            cols[1].astype(np.int32),
            cols[2].astype(np.int32),
            cols[3].astype(bool),
            cols[4].astype(bool),
        )

    def __len__(self) -> int:
        return len(self.z)


class SliceSampler:
    """Draws batches of slice rows: a fraction from tumour slices, one from liver slices,
    the rest uniformly. An empty category falls back to uniform sampling."""

    def __init__(self, table: SliceTable, fractions: tuple[float, float], seed: int) -> None:
        if len(table) == 0:
            raise ValueError("no slices to train on: the train split of the store is empty")
        self.table = table
        self.fractions = fractions
        self.rng = np.random.default_rng(seed)
        self.pools = (np.flatnonzero(table.tumour), np.flatnonzero(table.liver))

    def draw(self, batch: int) -> np.ndarray:
        """Row indices into the table, shape (batch,)."""
        n_tumour = round(batch * self.fractions[0])
        n_liver = round(batch * self.fractions[1])
        rows = []
        for pool, n in zip(self.pools, (n_tumour, n_liver), strict=True):
            source = pool if len(pool) else np.arange(len(self.table))
            rows.append(source[self.rng.integers(0, len(source), n)])
        rows.append(self.rng.integers(0, len(self.table), batch - n_tumour - n_liver))
        return np.concatenate(rows)

    def state(self) -> dict[str, object]:
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, object]) -> None:
        self.rng.bit_generator.state = state


def decode_scale(store: SliceStore, case_id: str) -> tuple[float, float]:
    """(scale, offset) turning stored image values into normalised float values."""
    t = store.case(case_id).meta.intensity
    return t.stored_scale, t.stored_offset


class ResidentSource:
    """All slices of the cases in one device tensor; batches are gathered by index."""

    def __init__(self, store: SliceStore, table: SliceTable, k: int, device: torch.device) -> None:
        images, labels, starts = [], [], [0]
        for case_id in table.case_ids:
            image, label = store.case(case_id).load()
            images.append(torch.from_numpy(np.ascontiguousarray(image)))
            labels.append(torch.from_numpy(label))
            starts.append(starts[-1] + image.shape[0])
        scale, offset = decode_scale(store, table.case_ids[0])
        self.scale, self.offset = scale, offset
        self.images = torch.cat(images).to(device)
        self.labels = torch.cat(labels).to(device)
        case_start = torch.tensor(starts[:-1], device=device)[
            torch.as_tensor(table.case, device=device)
        ]
        # Per-row lookups, moved to the device once (not per batch): slice index of the
        # row's case start, the row's z, and its case depth.
        self.row_start = case_start
        self.row_z = torch.as_tensor(table.z, device=device).long()
        self.row_depth = torch.as_tensor(table.depth, device=device).long()
        self.device = device
        self.offsets = torch.arange(-(k // 2), k // 2 + 1, device=device)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, k, Y, X) float32 (normalised) and labels (B, Y, X) int64."""
        r = torch.as_tensor(rows, device=self.device)
        start, z, depth = self.row_start[r], self.row_z[r], self.row_depth[r]
        window = torch.minimum(
            (z[:, None] + self.offsets[None, :]).clamp(min=0), depth[:, None] - 1
        )
        images = self.images[start[:, None] + window].float() * self.scale + self.offset
        return images, self.labels[start + z].long()


class StreamingSource:
    """2.5D samples read from Zarr by background threads into pinned memory, ahead of use.

    One thread assembles batches in submission order; ``threads`` readers fetch the
    samples of a batch in parallel (two pools, so a batch never waits on its own pool).
    """

    def __init__(
        self, store: SliceStore, table: SliceTable, k: int, threads: int, prefetch: int
    ) -> None:
        self.reader = CaseReader(store, k)
        self.table = table
        self.scale, self.offset = decode_scale(store, table.case_ids[0])
        self.readers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lp-read")
        self.assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lp-batch")
        self.pending: queue.Queue[Future[tuple[torch.Tensor, torch.Tensor]]] = queue.Queue(
            maxsize=prefetch
        )
        self.pin = torch.cuda.is_available()
        for case_id in table.case_ids:  # open every case once, before threads share the reader
            self.reader.sample(case_id, 0)

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        def one(row: int) -> tuple[np.ndarray, np.ndarray]:
            return self.reader.sample(
                self.table.case_ids[self.table.case[row]], int(self.table.z[row])
            )

        samples = list(self.readers.map(one, rows))
        images = torch.from_numpy(np.stack([s[0] for s in samples]).astype(np.float32))
        labels = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
        if self.pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images * self.scale + self.offset, labels

    def submit(self, rows: np.ndarray) -> None:
        """Start reading a batch; :meth:`next` returns batches in submission order."""
        self.pending.put(self.assembler.submit(self._read, rows))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pending.get().result()

    def close(self) -> None:
        self.assembler.shutdown(wait=True, cancel_futures=True)
        self.readers.shutdown(wait=True, cancel_futures=True)
