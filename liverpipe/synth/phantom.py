"""One phantom case: acquisition parameters, supersampled rendering and CT noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from liverpipe.synth.anatomy import Anatomy, sample_anatomy
from liverpipe.synth.render import label_of, paint

__all__ = ["Acquisition", "PhantomCase", "plan_case", "render_case", "sample_acquisition"]

Size = Literal["small", "full"]
ImageDtype = Literal["int16", "uint16", "float32"]

#: Axis codes a phantom file may be stored in; the first three are the common ones.
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS", "LPI", "RAI", "PLS", "ARS")
_SLICE_SPACINGS = (0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_NOISE_SIGMA_PX = 0.8  # in-plane correlation length of the noise, in voxels


@dataclass(frozen=True)
class Acquisition:
    """Scanner-side parameters of one case: grid, encoding and noise.

    ``shape`` is the canonical (Z, Y, X) shape; ``spacing`` is (x, y, z) in mm;
    ``origin`` is the patient-mm position of voxel (0, 0, 0); ``table`` is the world
    position of the patient origin, so the canonical affine translation is their sum.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    table: tuple[float, float, float]
    orientation: str
    image_dtype: ImageDtype
    uint16_slope: float
    compressed: bool
    label_float: bool
    qform_only: bool
    noise_sigma: float
    supersample: tuple[int, int]  # (z factor, in-plane factor), both odd

    @property
    def affine(self) -> np.ndarray:
        """Canonical affine: (x, y, z) indices of ``array[z, y, x]`` to RAS+ mm."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = np.add(self.origin, self.table)
        return aff


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """A rendered case on its canonical grid: HU (float32), tissue and label, all (Z, Y, X)."""

    case_id: str
    hu: np.ndarray
    tissue: np.ndarray
    label: np.ndarray
    acquisition: Acquisition
    anatomy: Anatomy

    @property
    def affine(self) -> np.ndarray:
        return self.acquisition.affine


def sample_acquisition(rng: np.random.Generator, anatomy: Anatomy, size: Size) -> Acquisition:
    """Draw grid, spacing, coverage, patient position, encoding and noise for one case."""
    lateral = anatomy.body_radii[0]
    n_xy = 512 if size == "full" else 96
    dx_full = rng.uniform(max(0.6, (2 * lateral + 24.0) / 512), 1.0)
    dx = dx_full * 512 / n_xy
    if size == "full":
        dz = float(rng.choice(_SLICE_SPACINGS))
        nz = int(np.clip(round(rng.uniform(150, 250) / dz), 40, 240))
    else:
        dz = float(rng.choice((3.0, 4.0, 5.0)))
        nz = int(np.clip(round(rng.uniform(150, 200) / dz), 30, 64))
    shift = rng.uniform(-20.0, 20.0, size=2)
    origin = (
        -(n_xy - 1) / 2 * dx + shift[0],
        -(n_xy - 1) / 2 * dx + shift[1] - 10.0,
        -(nz - 1) / 2 * dz + rng.uniform(-20.0, 25.0),
    )
    table = (rng.uniform(-15, 15), rng.uniform(-200, -120), rng.uniform(-900, -400))
    s_xy = 1 if size == "full" else 3
    s_z = int(np.clip(round(dz / (dx / s_xy)), 1, 5))
    s_z = min(s_z, max(1, 600 // nz))
    s_z += 1 - s_z % 2  # odd, so the centre sub-sample sits on the voxel centre
    return Acquisition(
        shape=(nz, n_xy, n_xy),
        spacing=(dx, dx, dz),
        origin=origin,
        table=table,
        orientation=str(rng.choice(ORIENTATIONS)),
        image_dtype=str(rng.choice(("int16", "int16", "uint16", "float32"))),  # type: ignore[arg-type]
        uint16_slope=float(rng.choice((1.0, 0.5))),
        compressed=bool(rng.random() < 0.65),
        label_float=bool(rng.random() < 0.15),
        qform_only=bool(rng.random() < 0.15),
        noise_sigma=float(rng.uniform(8.0, 20.0)),
        supersample=(max(s_z, 1), s_xy),
    )


def _rngs(seed: int, index: int) -> list[np.random.Generator]:
    """Independent generators for anatomy, acquisition and noise of one case."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)]


def plan_case(seed: int, index: int, size: Size = "small") -> tuple[Anatomy, Acquisition]:
    """Draw a case's anatomy and acquisition without rendering it (cheap)."""
    anatomy_rng, acq_rng, _ = _rngs(seed, index)
    anatomy = sample_anatomy(anatomy_rng)
    return anatomy, sample_acquisition(acq_rng, anatomy, size)


def render_case(seed: int, index: int, size: Size = "small", *, noise: bool = True) -> PhantomCase:
    """Render case ``index`` of the dataset with ``seed``; independent of other cases.

    Partial volume comes from rendering ``supersample`` sub-voxels per voxel and
    averaging; labels are the tissue at each voxel centre, so they agree exactly with
    the rendered anatomy.
    """
    anatomy, acq = plan_case(seed, index, size)
    hu, tissue = _render_supersampled(anatomy, acq)
    if noise:
        hu += _ct_noise(_rngs(seed, index)[2], hu.shape, acq.noise_sigma)
    return PhantomCase(f"phantom_{index:03d}", hu, tissue, label_of(tissue), acq, anatomy)


def _axis(origin: float, step: float, n: int, factor: int) -> np.ndarray:
    sub = (np.arange(factor) - (factor - 1) / 2) * step / factor
    return (origin + step * np.arange(n)[:, None] + sub[None, :]).ravel()


def _render_supersampled(
    anatomy: Anatomy, acq: Acquisition, slab: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    nz, ny, nx = acq.shape
    dx, dy, dz = acq.spacing
    s_z, s_xy = acq.supersample
    xs = _axis(acq.origin[0], dx, nx, s_xy)
    ys = _axis(acq.origin[1], dy, ny, s_xy)
    hu = np.empty(acq.shape, dtype=np.float32)
    tissue = np.empty(acq.shape, dtype=np.uint8)
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        zs = _axis(acq.origin[2] + z0 * dz, dz, z1 - z0, s_z)
        fine_hu, fine_tissue = paint(anatomy, xs, ys, zs)
        blocks = fine_hu.reshape(z1 - z0, s_z, ny, s_xy, nx, s_xy)
        hu[z0:z1] = blocks.mean(axis=(1, 3, 5))
        tissue[z0:z1] = fine_tissue[s_z // 2 :: s_z, s_xy // 2 :: s_xy, s_xy // 2 :: s_xy]
    return hu, tissue


def _ct_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise correlated in-plane (like filtered back-projection), std ``sigma`` HU."""
    delta = np.zeros(33)
    delta[16] = 1.0
    kernel = gaussian_filter1d(delta, _NOISE_SIGMA_PX)
    white_std = sigma / float(np.sum(kernel**2))  # 2D separable kernel: std scales by sum(k^2)
    out = np.empty(shape, dtype=np.float32)
    for z in range(shape[0]):
        white = rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(white_std)
        out[z] = gaussian_filter(white, _NOISE_SIGMA_PX)
    return out
