"""NIfTI-1/2 reading: header checks first, then the voxel data.

The header is validated before any voxel is decompressed, so an absurd or truncated
file is refused cheaply. Data are decompressed with ISA-L (``isal``), about three times
faster than the standard library's zlib, and returned in native byte order.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import nibabel as nib
import numpy as np
from isal import igzip
from nibabel.openers import ImageOpener

from liverpipe.errors import InvalidScanError, LiverpipeError
from liverpipe.geometry import SPATIAL_DIMS, axis_codes, orientation, voxel_spacing
from liverpipe.io.sniff import sniff
from liverpipe.settings import CheckConfig

__all__ = [
    "NIFTI_SUFFIXES",
    "NiftiInfo",
    "case_id_of",
    "file_sha256",
    "is_nifti",
    "not_a_file",
    "read_header",
    "read_labels_hashed",
    "read_voxels",
    "read_voxels_hashed",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Bytes read and decompressed per call: as fast as 16 MB pieces here, and the reader's
#: buffer and the decompressor's temporary take 8 MB instead of 32 MB.
_GUNZIP_PIECE = 4 << 20
AffineSource = Literal["sform", "qform", "pixdim"]

#: Widest voxel type read (8 bytes: int64, float64); wider is refused, not guessed at.
_MAX_ITEMSIZE = 8
#: An affine whose 3x3 determinant is below this (mm^3) maps voxels onto a plane or a line.
_SINGULAR = 1e-9


def is_nifti(path: Path) -> bool:
    """True for visible ``.nii``/``.nii.gz`` files (hidden and macOS ``._*`` files excluded)."""
    name = path.name
    return not name.startswith(".") and name.endswith(NIFTI_SUFFIXES)


def case_id_of(path: Path) -> str:
    """The file name without ``.nii``/``.nii.gz``: ``liver_3.nii.gz`` -> ``liver_3``."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True, eq=False)
class NiftiInfo:
    """What the header says about one file; no voxel has been read yet.

    ``shape`` and ``spacing`` follow the file's voxel axes (i, j, k); spacing in mm.
    ``affine`` maps (i, j, k) to RAS+ millimetres: the sform when its code is set, else
    the qform, else a guess from pixdim (nibabel's choice); ``affine_source`` says which.
    ``warnings`` are sentences (file, problem, fix) about usable but doubtful headers.
    """

    path: Path
    image: nib.Nifti1Image | nib.Nifti2Image
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    disk_dtype: np.dtype[Any]
    axcodes: tuple[str, str, str]
    affine_source: AffineSource = "sform"
    warnings: tuple[str, ...] = ()

    @property
    def header(self) -> nib.Nifti1Header:
        return self.image.header


def read_header(path: Path, limits: CheckConfig | None = None) -> NiftiInfo:
    """Parse and validate a NIfTI header without reading voxel data.

    Raises:
        InvalidScanError: the file is missing, empty, another format (named by its
            content), not 3D, too large, has an unsupported data type, a header nibabel
            refuses, non-positive spacing or a singular affine, or (for ``.nii``) is
            shorter than its header promises.
    """
    limits = limits or CheckConfig()
    path = Path(path)
    image = _load_lazy(path)
    try:
        return _parse_header(path, image, limits)
    except LiverpipeError:
        raise
    except Exception as err:  # nibabel's own checks, or arithmetic on garbage fields
        raise InvalidScanError(
            path,
            f"the NIfTI header is inconsistent ({type(err).__name__}: {err})",
            "export the scan again (e.g. dcm2niix), or repair the named header field",
        ) from err


def _parse_header(
    path: Path, image: nib.Nifti1Image | nib.Nifti2Image, limits: CheckConfig
) -> NiftiInfo:
    shape = _spatial_shape(path, tuple(int(d) for d in image.shape))
    _check_size(path, shape, limits)
    dtype = _check_dtype(path, image)
    _check_raw_pixdim(path, type(image.header))
    _check_offset(path, image)
    _proxy_float(image, "slope"), _proxy_float(image, "inter")  # nibabel validates them here
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(path, affine)
    spacing = tuple(float(s) for s in voxel_spacing(affine))
    if path.name.endswith(".nii"):
        _check_plain_length(path, image, shape, dtype)
    axcodes = tuple(axis_codes(affine))
    source, warnings = _affine_source(path, image.header, shape, limits.affine_tolerance_mm)
    return NiftiInfo(path, image, shape, spacing, affine, dtype, axcodes, source, warnings)  # type: ignore[arg-type]


def _affine_source(
    path: Path, header: nib.Nifti1Header, shape: tuple[int, int, int], tolerance_mm: float
) -> tuple[AffineSource, tuple[str, ...]]:
    """Which transform ``image.affine`` is, and warnings when the header is ambiguous."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if scode == 0 and qcode == 0:
        return "pixdim", (
            f"{path}: qform_code and sform_code are both 0, so the voxel-to-world affine is "
            "a guess from the voxel size alone (no orientation, no origin). Fix: export the "
            "scan again with its real orientation (e.g. dcm2niix), or set the qform/sform.",
        )
    if scode == 0 or qcode == 0:
        return ("sform" if scode else "qform"), ()
    qform, sform = header.get_qform(), header.get_sform()
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ]
    )
    gap = float(np.abs(corners @ qform.T - corners @ sform.T)[:, :3].max())
    if not gap <= tolerance_mm:
        return "sform", (
            f"{path}: the qform and the sform disagree by {gap:.4g} mm at the volume's corners "
            f"(qform {_axes(qform)} origin {_origin(qform)}; sform {_axes(sform)} origin "
            f"{_origin(sform)}). liverpipe uses the sform, as nibabel does; tools that read "
            "the qform (ITK-based ones such as ITK-SNAP, 3D Slicer and SimpleITK may) will "
            "show the scan and its masks elsewhere. Fix: make them agree, e.g. "
            "`img.set_qform(img.get_sform())` in nibabel, once you know which one is right.",
        )
    return "sform", ()


def _axes(affine: np.ndarray) -> str:
    return axis_codes(affine)


def _origin(affine: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in affine[:3, 3]) + ")"


def read_voxels(info: NiftiInfo) -> np.ndarray:
    """Read the voxel array on the file's (i, j, k) grid, native byte order.

    Integer data without scaling keep their dtype; scaled data (scl_slope/scl_inter) and
    float data come back as float32. Never float64. Data are decompressed straight into
    their final buffer, so peak memory is the compressed file plus the volume.

    Raises:
        InvalidScanError: the file is truncated or its gzip stream is corrupt.
    """
    return read_voxels_hashed(info)[0]


def read_voxels_hashed(info: NiftiInfo) -> tuple[np.ndarray, str]:
    """:func:`read_voxels` plus the sha256 of the file bytes that were decoded."""
    with _unreadable_is_invalid(info):
        return _read_voxels_hashed(info)


@contextmanager
def _unreadable_is_invalid(info: NiftiInfo) -> Iterator[None]:
    """An error of the readers' libraries on ``info``'s data becomes an InvalidScanError."""
    try:
        yield
    except LiverpipeError:
        raise
    except (OSError, ValueError, TypeError, ArithmeticError) as err:
        raise InvalidScanError(
            info.path,
            f"the voxel data cannot be read ({type(err).__name__}: {err})",
            "download or export the file again",
        ) from err


def _read_voxels_hashed(info: NiftiInfo) -> tuple[np.ndarray, str]:
    offset = _proxy_int(info.image, "offset")
    need = offset + int(np.prod(info.shape)) * info.disk_dtype.itemsize
    if info.path.name.endswith(".gz"):
        # One pass over the file: its bytes are hashed as the decompressor reads them, and
        # the compressed file is never held in memory whole.
        sha = hashlib.sha256()
        buffer = np.empty(need, dtype=np.uint8)
        with info.path.open("rb", buffering=0) as fh:
            raw = _HashingReader(fh, sha)
            got = _gunzip_into(info, io.BufferedReader(raw, _GUNZIP_PIECE), buffer.data)
            raw.drain()  # whatever the decompressor did not need: hashed all the same
        digest = sha.hexdigest()
    else:  # read the whole file once: it is both hashed and decoded
        buffer = np.empty(max(need, info.path.stat().st_size), dtype=np.uint8)
        with info.path.open("rb") as fh:
            got = fh.readinto(buffer.data)
        digest = hashlib.sha256(buffer.data[:got]).hexdigest()
    if got < need:
        raise InvalidScanError(
            info.path,
            f"the file holds {got} bytes of header and data but the header needs {need}",
            "the file is truncated; download or export it again",
        )
    data = buffer[offset:need].view(info.disk_dtype).reshape(info.shape, order="F")
    return _scaled(info, data), digest


def read_labels_hashed(
    info: NiftiInfo, check: Callable[[np.ndarray], None]
) -> tuple[np.ndarray, str]:
    """A label map's voxels as uint8 (``info.shape``, Fortran order, as :func:`read_voxels`
    orders them) and the sha256 of the file bytes.

    A uint8 file is decoded straight into its array. Any other type (int16 and float32
    labels are common) is decoded piece by piece: ``check`` sees each piece in the file's
    own type, scaled, and raises for values that are not labels before the piece is cast;
    no buffer of the file's type is ever the size of the volume (a float32 label would
    need four times the uint8 map).

    Raises:
        InvalidScanError: the file is truncated or its gzip stream is corrupt; whatever
            ``check`` raises.
    """
    if info.disk_dtype == np.uint8 and _slope_inter(info) == (1.0, 0.0):
        data, digest = read_voxels_hashed(info)
        check(data)
        return data, digest
    with _unreadable_is_invalid(info):
        return _read_labels_hashed(info, check)


def _read_labels_hashed(
    info: NiftiInfo, check: Callable[[np.ndarray], None]
) -> tuple[np.ndarray, str]:
    out = np.empty(info.shape, dtype=np.uint8, order="F")
    flat = out.reshape(-1, order="F")  # a view: the file's voxel order
    itemsize = info.disk_dtype.itemsize
    piece = np.empty(_GUNZIP_PIECE - _GUNZIP_PIECE % itemsize, dtype=np.uint8)
    sha = hashlib.sha256()
    filled = 0
    with info.path.open("rb", buffering=0) as fh:
        raw = _HashingReader(fh, sha)
        source = io.BufferedReader(raw, _GUNZIP_PIECE)
        stream: Any = igzip.GzipFile(fileobj=source) if info.path.name.endswith(".gz") else source
        try:
            with stream:
                skip = _proxy_int(info.image, "offset")
                while skip > 0 and (n := _fill(stream, piece.data[: min(skip, piece.size)])):
                    skip -= n
                while skip == 0 and filled < flat.size:
                    want = min(piece.size, (flat.size - filled) * itemsize)
                    n = _fill(stream, piece.data[:want])
                    if n < want:
                        break
                    values = _scaled(info, piece[:n].view(info.disk_dtype))
                    check(values)
                    flat[filled : filled + values.size] = values
                    filled += values.size
        except LiverpipeError:
            raise
        except Exception as err:  # isal raises EOFError, OSError, ValueError or its own error
            if not isinstance(stream, igzip.GzipFile):
                raise
            raise _damaged_gzip(info, err) from err
        raw.drain()
    if filled < flat.size:
        need = _proxy_int(info.image, "offset") + flat.size * itemsize
        raise InvalidScanError(
            info.path,
            f"the file holds fewer bytes of header and data than the header needs ({need})",
            "the file is truncated; download or export it again",
        )
    return out, sha.hexdigest()


def _fill(stream: Any, into: memoryview) -> int:
    """Read into all of ``into`` unless the stream ends first; returns the bytes read."""
    got = 0
    while got < len(into):
        n = stream.readinto(into[got:])
        if not n:
            break
        got += n
    return got


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, read in blocks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _scaled(info: NiftiInfo, data: np.ndarray) -> np.ndarray:
    """Apply scl_slope/scl_inter in float32; make the byte order native."""
    slope, inter = _slope_inter(info)
    scaled = slope != 1.0 or inter != 0.0
    if scaled or (data.dtype.kind == "f" and data.dtype != np.float32):
        out = data.astype(np.float32, order="F")
        if scaled:  # overflow becomes inf, which the value check then names
            with np.errstate(over="ignore", invalid="ignore"):
                out *= np.float32(slope)
                out += np.float32(inter)
        return out
    if data.dtype.isnative:
        return data
    return data.astype(data.dtype.newbyteorder("="), order="F")


class _HashingReader(io.RawIOBase):
    """A raw file reader that feeds every byte it reads to ``digest``, once, in order."""

    def __init__(self, fh: io.RawIOBase, digest: Any) -> None:
        self.fh, self.digest = fh, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.fh.readinto(b) or 0
        self.digest.update(memoryview(b)[:n])
        return n

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        piece = bytearray(_GUNZIP_PIECE)
        while self.readinto(piece):
            pass


def _gunzip_into(info: NiftiInfo, compressed: BinaryIO, out: memoryview) -> int:
    """Decompress the gzip stream ``compressed`` into ``out``; returns the bytes written."""
    filled = 0
    try:
        with igzip.GzipFile(fileobj=compressed) as gz:
            while filled < len(out):  # in pieces: readinto allocates a temporary of its size
                n = gz.readinto(out[filled : filled + _GUNZIP_PIECE])
                if not n:
                    break
                filled += n
    except Exception as err:  # isal raises EOFError, OSError, ValueError or its own error
        raise _damaged_gzip(info, err) from err
    return filled


def _damaged_gzip(info: NiftiInfo, err: Exception) -> InvalidScanError:
    return InvalidScanError(
        info.path,
        f"the gzip stream is truncated or corrupt ({err})",
        "download or export the file again; `gzip -t FILE` confirms the damage",
    )


def _slope_inter(info: NiftiInfo) -> tuple[float, float]:
    """scl_slope and scl_inter (a loaded nibabel image keeps them on its array proxy, not
    its header)."""
    return _proxy_float(info.image, "slope"), _proxy_float(info.image, "inter")


def _proxy_int(image: nib.Nifti1Image | nib.Nifti2Image, name: str) -> int:
    return int(getattr(image.dataobj, name))


def _proxy_float(image: nib.Nifti1Image | nib.Nifti2Image, name: str) -> float:
    return float(getattr(image.dataobj, name))


def not_a_file(path: Path) -> InvalidScanError:
    """The error for a scan path that is not a readable file: a broken link and a folder
    named like a scan are named as such, not as a missing file."""
    if path.is_symlink() and not path.exists():
        return InvalidScanError(
            path,
            f"the file is a symbolic link to {os.readlink(path)}, which does not exist",
            "point the link at the scan, or copy the scan in its place",
        )
    if path.is_dir():
        return InvalidScanError(
            path,
            "this is a folder, not a file",
            "put the .nii/.nii.gz file itself here (a DICOM series folder goes through "
            "`liverpipe convert` first)",
        )
    if path.exists():
        return InvalidScanError(path, "this is not a regular file", "replace it with the scan file")
    return InvalidScanError(path, "the file does not exist", "check the path and the data folder")


def _load_lazy(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    if not path.is_file():
        raise not_a_file(path)
    try:
        kind = sniff(path)
    except OSError as err:
        raise InvalidScanError(
            path, f"the file cannot be opened ({err})", "check its permissions"
        ) from err
    if not kind.nifti:
        detail = f" ({kind.gzip_error})" if kind.gzip_error else ""
        raise InvalidScanError(path, f"the file is {kind.name}{detail}", kind.fix)
    if path.name.endswith(".gz") and not kind.gzip:
        raise InvalidScanError(
            path,
            f"the file is plain (uncompressed) {kind.name} but its name ends in .gz",
            "rename it to .nii",
        )
    if not path.name.endswith(".gz") and kind.gzip:
        raise InvalidScanError(
            path,
            f"the file is gzip-compressed {kind.name} but its name ends in .nii",
            "rename it to .nii.gz",
        )
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for a damaged header
        raise InvalidScanError(
            path,
            f"nibabel refuses the {kind.name} header ({type(err).__name__}: {err})",
            _header_fix(str(err)),
        ) from err
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InvalidScanError(
            path, f"the file is {type(image).__name__}, not NIfTI", "convert it to NIfTI"
        )
    return image


def _header_fix(message: str) -> str:
    """The fix for a header nibabel refuses, from what it complains about."""
    lowered = message.lower()
    if "slope" in lowered or "intercept" in lowered:
        return (
            "set scl_slope/scl_inter to finite values (1 and 0 when the data need no "
            "scaling), e.g. nibabel `img.header.set_slope_inter(1, 0)` on a copy"
        )
    if "w2 should be positive" in lowered or "quaternion" in lowered:
        return (
            "the qform quaternion (quatern_b, quatern_c, quatern_d) is not a rotation "
            "(b^2 + c^2 + d^2 > 1); if the sform holds the real orientation set qform_code "
            "to 0, else write the qform again (nibabel `img.set_qform(affine)` on a copy)"
        )
    if "data type" in lowered or "datatype" in lowered or "dtype" in lowered:
        return "save the scan as int16, uint16 or float32"
    return "export the scan again as NIfTI (e.g. dcm2niix) or download it again"


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < SPATIAL_DIMS or any(d > 1 for d in shape[SPATIAL_DIMS:]):
        raise InvalidScanError(
            path,
            f"the volume has shape {shape}; a 3D volume (trailing singleton axes allowed) is required",
            "split 4D series into 3D volumes and pass one per case",
        )
    return (shape[0], shape[1], shape[2])


def _check_size(path: Path, shape: tuple[int, int, int], limits: CheckConfig) -> None:
    voxels = int(np.prod(shape, dtype=np.int64))
    if min(shape) < 1 or max(shape) > limits.max_dim or voxels > limits.max_voxels:
        raise InvalidScanError(
            path,
            f"the header claims shape {shape} ({voxels} voxels); the limits are "
            f"{limits.max_dim} per axis and {limits.max_voxels} voxels",
            "check that the header is not corrupt, or raise [check] max_dim / max_voxels",
        )


#: Largest vox_offset accepted: header plus extensions (DICOM or JSON sidecars fit easily).
MAX_VOX_OFFSET = 64 << 20


def _check_offset(path: Path, image: nib.Nifti1Image | nib.Nifti2Image) -> None:
    """Refuse a vox_offset inside the header or absurdly far beyond it (a corrupt field),
    before anything is allocated from it."""
    offset = _proxy_int(image, "offset")
    size = int(image.header.sizeof_hdr)
    if not size <= offset <= MAX_VOX_OFFSET:
        raise InvalidScanError(
            path,
            f"the header puts the voxel data at byte {offset} (vox_offset); it must lie "
            f"between the end of the {size}-byte header and {MAX_VOX_OFFSET} bytes",
            "the header is corrupt; export or download the scan again",
        )


def _check_dtype(path: Path, image: nib.Nifti1Image | nib.Nifti2Image) -> np.dtype[Any]:
    dtype = np.dtype(image.header.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "iuf" or dtype.itemsize > _MAX_ITEMSIZE:
        raise InvalidScanError(
            path,
            f"voxel data type {dtype} is not a real scalar type",
            "save the scan as int16, uint16 or float32",
        )
    return dtype


def _check_raw_pixdim(path: Path, header_class: type[nib.Nifti1Header]) -> None:
    """Refuse zero or non-finite pixdim, which nibabel would silently reset to 1 mm."""
    with ImageOpener(str(path)) as fh:
        raw = header_class.from_fileobj(fh, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.isfinite(pixdim).all() or (pixdim == 0).any():
        raise InvalidScanError(
            path,
            f"voxel spacing (pixdim) {tuple(float(v) for v in pixdim)} mm is not positive and finite",
            "set pixdim[1..3] in the header to the real voxel size (e.g. nibabel set_zooms)",
        )


def _check_affine(path: Path, affine: np.ndarray) -> None:
    finite = bool(np.isfinite(affine).all())
    det = float(np.linalg.det(affine[:3, :3])) if finite else 0.0
    if not finite or abs(det) < _SINGULAR:
        raise InvalidScanError(
            path,
            "the voxel-to-world affine (sform/qform) is not finite and invertible",
            "repair the sform/qform in the header (e.g. nibabel set_sform with a valid matrix)",
        )
    if np.isnan(orientation(affine)).any():  # two voxel axes point along one body axis
        raise InvalidScanError(
            path,
            f"the voxel axes cannot be matched to the patient's axes (affine {_axes_text(affine)} "
            "is sheared or degenerate)",
            "repair the sform/qform in the header; a CT volume's voxel axes are orthogonal",
        )


def _axes_text(affine: np.ndarray) -> str:
    return "[" + "; ".join(", ".join(f"{v:.3g}" for v in row) for row in affine[:3]) + "]"


def _check_plain_length(
    path: Path,
    image: nib.Nifti1Image | nib.Nifti2Image,
    shape: tuple[int, int, int],
    dtype: np.dtype[Any],
) -> None:
    need = _proxy_int(image, "offset") + int(np.prod(shape)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise InvalidScanError(
            path,
            f"the file is {have} bytes but its header needs {need}",
            "the file is truncated; download or export it again",
        )
