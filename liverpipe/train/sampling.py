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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from liverpipe.labels import Label
from liverpipe.roi import (
    Box,
    crop,
    grow,
    liver_box,
    liver_median,
    margin_voxels,
    relative,
    relative_gain,
)
from liverpipe.settings import TrainConfig, TumourAugmentConfig
from liverpipe.train.lesions import draw_lesions, implant_lesions
from storage import CaseReader, SliceStore

__all__ = [
    "ResidentSource",
    "RoiSource",
    "SliceSampler",
    "SliceTable",
    "StreamingSource",
    "decode_scale",
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
        # On the CPU the slices are decoded once (float32, twice the stored bytes) so a
        # batch is one gather; a GPU keeps the stored dtype and decodes each batch.
        self.decoded = device.type == "cpu"
        if self.decoded:
            self.images = self.images.float().mul_(scale).add_(offset)
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
        images = self.images[start[:, None] + window]
        if not self.decoded:
            images = images.float() * self.scale + self.offset
        return images, self.labels[start + z].long()


class StreamingSource:
    """2.5D samples read from Zarr by background threads into pinned memory, ahead of use.

    One thread assembles batches in submission order; ``threads`` readers fetch the
    samples of a batch in parallel (two pools, so a batch never waits on its own pool).
    """

    def __init__(
        self,
        store: SliceStore,
        table: SliceTable,
        k: int,
        threads: int,
        prefetch: int,
        cache_bytes: int = 0,
    ) -> None:
        self.reader = CaseReader(store, k, cache_bytes)
        self.table = table
        self.scale, self.offset = decode_scale(store, table.case_ids[0])
        self.readers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lp-read")
        self.assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lp-batch")
        self.pending: queue.Queue[Future[tuple[torch.Tensor, torch.Tensor]]] = queue.Queue(
            maxsize=prefetch
        )
        self.pin = torch.cuda.is_available()
        for case_id in table.case_ids:  # open every case once, before threads share the reader
            _, label = self.reader.sample(case_id, 0)
        self.slice_shape = label.shape

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Each reader decodes its samples straight into the batch's float32 buffer."""
        images = np.empty((len(rows), self.reader.k, *self.slice_shape), dtype=np.float32)
        labels = np.empty((len(rows), *self.slice_shape), dtype=np.int64)
        scale, offset = np.float32(self.scale), np.float32(self.offset)

        def one(i: int) -> None:
            row = rows[i]
            image, label = self.reader.sample(
                self.table.case_ids[self.table.case[row]], int(self.table.z[row])
            )
            np.multiply(image, scale, out=images[i])
            images[i] += offset
            labels[i] = label

        list(self.readers.map(one, range(len(rows))))
        out_images, out_labels = torch.from_numpy(images), torch.from_numpy(labels)
        if self.pin:
            out_images, out_labels = out_images.pin_memory(), out_labels.pin_memory()
        return out_images, out_labels

    def submit(self, rows: np.ndarray) -> None:
        """Start reading a batch; :meth:`next` returns batches in submission order."""
        self.pending.put(self.assembler.submit(self._read, rows))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pending.get().result()

    def close(self) -> None:
        self.assembler.shutdown(wait=True, cancel_futures=True)
        self.readers.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class _RoiCase:
    """One case's region around its liver, resident: relative image and labels."""

    image: torch.Tensor  # (Z', Y', X') float32, liver-relative
    label: torch.Tensor  # (Z', Y', X') int64
    region: Box  # where the tensors lie in the stored case's indices (in-plane it may
    # reach beyond the stored slice: air there)
    roi: Box  # the liver box plus margin, in the same stored indices
    tumour_yx: list[np.ndarray]  # per ROI slice: (N, 2) stored (y, x) of tumour voxels


class RoiSource:
    """Tumour-stage batches: 2.5D crops inside (jittered) liver ROIs, liver-relative.

    Every case of ``table`` is held in memory around its liver: the ground-truth liver's
    bounding box grown by ``roi_margin_mm``, with room for any crop on every side (air
    beyond the stored slice), so a crop is a plain slice. A row (case, z) of the table is
    one ROI slice. Its crop is centred near a tumour voxel (tumour rows) or on a point of
    the ROI whose edges are shifted by up to ``roi_jitter_mm`` (stage 1's ROI is never
    exact), then cut to ``crop_size``. With ``[tumour.augment] lesions`` > 0, synthetic
    lesions are painted into some crops' liver (:mod:`liverpipe.train.lesions`). Random
    draws come from ``rng``, the sampler's generator, so a checkpoint that saves the
    sampler resumes the same crops.
    """

    def __init__(
        self,
        store: SliceStore,
        table: SliceTable,
        cfg: TrainConfig,
        device: torch.device,
        rng: np.random.Generator,
        cases: dict[str, _RoiCase],
    ) -> None:
        self.table, self.cfg, self.device, self.rng = table, cfg, device, rng
        self.cases = [cases[c] for c in table.case_ids]
        self.spacing = [store.case(c).meta.spacing for c in table.case_ids]

    @staticmethod
    def prepare(
        store: SliceStore, case_ids: list[str], cfg: TrainConfig, device: torch.device
    ) -> tuple[SliceTable, dict[str, _RoiCase]]:
        """The ROI slices of the cases with liver, as a table, and their resident regions."""
        prepared: dict[str, _RoiCase] = {}
        rows: list[tuple[int, int, int, bool, bool]] = []
        kept: list[str] = []
        for case_id in case_ids:
            case = _roi_case(store, case_id, cfg, device)
            if case is None:
                continue
            index = len(kept)
            kept.append(case_id)
            prepared[case_id] = case
            depth = case.roi.z1 - case.roi.z0
            for i, yx in enumerate(case.tumour_yx):
                rows.append((index, case.roi.z0 + i, depth, True, len(yx) > 0))
        if not rows:
            raise ValueError("no train case has liver: the tumour stage has nothing to learn")
        cols = list(zip(*rows, strict=True))
        table = SliceTable(
            tuple(kept),
            np.asarray(cols[0], np.int32),
            np.asarray(cols[1], np.int32),
            np.asarray(cols[2], np.int32),
            np.asarray(cols[3], bool),
            np.asarray(cols[4], bool),
        )
        return table, prepared

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, k, h, w) float32 (liver-relative) and labels (B, h, w) int64."""
        crops = [self._crop(int(r)) for r in rows]
        images = torch.stack([c[0] for c in crops])
        labels = torch.stack([c[1] for c in crops])
        return images, labels

    def _crop(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[self.table.case[row]]
        z = int(self.table.z[row])
        h, w = self.cfg.crop_size
        tumour = case.tumour_yx[z - case.roi.z0]
        if len(tumour) and self.table.tumour[row]:
            cy, cx = tumour[self.rng.integers(0, len(tumour))]
            cy, cx = (
                cy + self.rng.integers(-h // 4, h // 4 + 1),
                cx + self.rng.integers(-w // 4, w // 4 + 1),
            )
        else:
            _, jy, jx = margin_voxels(self.cfg.roi_jitter_mm, self.spacing[self.table.case[row]])
            y0, y1 = (
                case.roi.y0 + self.rng.integers(-jy, jy + 1),
                case.roi.y1 + self.rng.integers(-jy, jy + 1),
            )
            x0, x1 = (
                case.roi.x0 + self.rng.integers(-jx, jx + 1),
                case.roi.x1 + self.rng.integers(-jx, jx + 1),
            )
            cy = self.rng.integers(min(y0, y1 - 1), max(y0, y1 - 1) + 1)
            cx = self.rng.integers(min(x0, x1 - 1), max(x0, x1 - 1) + 1)
        k = self.cfg.context_slices
        zs = np.clip(np.arange(z - k // 2, z + k // 2 + 1), case.region.z0, case.region.z1 - 1)
        # The region holds every crop whole (air beyond the stored slice): plain slicing.
        y0 = min(max(int(cy) - h // 2 - case.region.y0, 0), case.image.shape[1] - h)
        x0 = min(max(int(cx) - w // 2 - case.region.x0, 0), case.image.shape[2] - w)
        index = (torch.as_tensor(zs - case.region.z0), slice(y0, y0 + h), slice(x0, x0 + w))
        image, labels = case.image[index], case.label[index]
        return self._lesions(image, labels, self.spacing[self.table.case[row]])

    def _lesions(
        self, image: torch.Tensor, labels: torch.Tensor, spacing: tuple[float, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic lesions painted into the crop's liver (``[tumour.augment] lesions``);
        the centre slice's labels."""
        aug = self.cfg.augment
        if not isinstance(aug, TumourAugmentConfig) or aug.lesions == 0:
            return image, labels[labels.shape[0] // 2]
        liver = (labels[labels.shape[0] // 2] >= Label.LIVER).float()
        inner = -torch.nn.functional.max_pool2d(-liver[None, None], 5, stride=1, padding=2)[0, 0]
        liver_yx = torch.nonzero(liver > 0).cpu().numpy()
        edge_yx = torch.nonzero((liver > 0) & (inner == 0)).cpu().numpy()  # within 2 voxels
        lesions = draw_lesions(self.rng, liver_yx, edge_yx, spacing, aug)
        return implant_lesions(
            image,
            labels,
            lesions,
            spacing,
            relative_gain(1.0, self.cfg.relative_window_hu),  # per HU
            self.cfg.relative_clip,
        )


def _roi_case(
    store: SliceStore, case_id: str, cfg: TrainConfig, device: torch.device
) -> _RoiCase | None:
    stored = store.case(case_id)
    image, label = stored.load()
    box = liver_box(label > 0)
    if box is None:
        return None
    spacing = stored.meta.spacing
    roi = grow(box, margin_voxels(cfg.roi_margin_mm, spacing)).clip(label.shape)
    _, jy, jx = margin_voxels(cfg.roi_jitter_mm, spacing)
    h, w = cfg.crop_size
    # Room for any crop: a centre up to the jitter (or a quarter crop, around tumour)
    # beyond the ROI, plus half a crop; in z only what the slices hold.
    room = (cfg.context_slices // 2, max(jy, h // 4) + h // 2 + 1, max(jx, w // 4) + w // 2 + 1)
    grown = grow(roi, room)
    region = Box(
        max(grown.z0, 0), min(grown.z1, label.shape[0]), grown.y0, grown.y1, grown.x0, grown.x1
    )
    t = stored.meta.intensity
    air = image[region.clip(label.shape).slices].min()  # beyond the stored slice
    decoded = crop(image, region, air).astype(np.float32) * t.stored_scale + t.stored_offset
    labels = crop(label, region, 0)
    median = liver_median(decoded, labels > 0)
    rel = relative(
        decoded, median, relative_gain(t.hu_scale, cfg.relative_window_hu), cfg.relative_clip
    )
    tumour_yx = [np.argwhere(label[z] == Label.TUMOUR) for z in range(roi.z0, roi.z1)]
    return _RoiCase(
        torch.from_numpy(rel).to(device),
        torch.from_numpy(labels.astype(np.int64)).to(device),
        region,
        roi,
        tumour_yx,
    )
