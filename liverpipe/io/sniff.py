"""What a file really is, from its first bytes: the diagnosis for files that are not NIfTI.

A zero-byte file, a PNG saved as ``.nii.gz`` or a Git LFS pointer each need a different
fix; the file name says nothing about which one it is. :func:`sniff` reads at most a few
kilobytes (decompressing only the start of a gzip stream) and names the format.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileKind", "is_nifti_header", "kind_of_bytes", "sniff"]

_HEAD = 4096
GZIP_MAGIC = b"\x1f\x8b"
#: ``sizeof_hdr`` of a NIfTI-1 (and Analyze 7.5) header and of a NIfTI-2 header, in bytes.
NIFTI1_HEADER, NIFTI2_HEADER = 348, 540
#: NIfTI-2's magic sits at bytes 4..7 (NIfTI-1's at 344..347).
_NIFTI2_MAGIC_END = 12
#: Bytes of a plain text file: printable ASCII, tab, newline, carriage return.
_TEXT_BYTES = frozenset(range(32, 127)) | {9, 10, 13}

#: (offset, magic, name, fix) for formats a CT folder is likely to hold by mistake.
_MAGICS: tuple[tuple[int, bytes, str, str], ...] = (
    (
        0,
        b"\x89PNG\r\n\x1a\n",
        "a PNG image",
        "export the CT volume itself as NIfTI, not a picture of it",
    ),
    (
        0,
        b"\xff\xd8\xff",
        "a JPEG image",
        "export the CT volume itself as NIfTI, not a picture of it",
    ),
    (0, b"GIF8", "a GIF image", "export the CT volume itself as NIfTI, not a picture of it"),
    (0, b"II*\x00", "a TIFF image", "export the CT volume itself as NIfTI, not a picture of it"),
    (0, b"MM\x00*", "a TIFF image", "export the CT volume itself as NIfTI, not a picture of it"),
    (
        128,
        b"DICM",
        "a DICOM file",
        "convert the DICOM series to NIfTI (e.g. `dcm2niix -z y SERIES_DIR`)",
    ),
    (
        0,
        b"PK\x03\x04",
        "a ZIP archive",
        "unzip it and point liverpipe at the .nii/.nii.gz files inside",
    ),
    (0, b"PK\x05\x06", "an empty ZIP archive", "replace it with the scan itself"),
    (
        257,
        b"ustar",
        "a tar archive",
        "unpack it (`tar xf FILE`) and use the .nii/.nii.gz files inside",
    ),
    (0, b"BZh", "a bzip2 stream", "decompress it (`bunzip2`) and recompress with gzip as .nii.gz"),
    (
        0,
        b"\xfd7zXZ\x00",
        "an xz stream",
        "decompress it (`unxz`) and recompress with gzip as .nii.gz",
    ),
    (
        0,
        b"\x28\xb5\x2f\xfd",
        "a zstd stream",
        "decompress it (`unzstd`) and recompress with gzip as .nii.gz",
    ),
    (
        0,
        b"7z\xbc\xaf\x27\x1c",
        "a 7-Zip archive",
        "unpack it and use the .nii/.nii.gz files inside",
    ),
    (0, b"%PDF", "a PDF document", "replace it with the scan itself"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file", "convert the volume to NIfTI (e.g. nibabel.save)"),
    (
        0,
        b"\x93NUMPY",
        "a NumPy .npy array",
        "save it as NIfTI with its real affine (nibabel.Nifti1Image)",
    ),
    (
        0,
        b"NRRD",
        "an NRRD volume",
        "convert it to NIfTI (e.g. SimpleITK ReadImage then WriteImage)",
    ),
    (
        0,
        b"ObjectType",
        "a MetaImage (.mha/.mhd) volume",
        "convert it to NIfTI (e.g. SimpleITK ReadImage then WriteImage)",
    ),
    (
        0,
        b"version https://git-lfs",
        "a Git LFS pointer, not the file it points to",
        "fetch the real file (`git lfs pull`)",
    ),
    (0, b"<!DOCTYPE", "an HTML page (a failed download?)", "download the scan again"),
    (0, b"<html", "an HTML page (a failed download?)", "download the scan again"),
    (0, b"<?xml", "an XML document", "replace it with the scan itself"),
)


@dataclass(frozen=True)
class FileKind:
    """A file's format by content. ``nifti`` is True for a NIfTI-1/2 header (any byte order)."""

    size: int
    gzip: bool
    nifti: bool
    name: str  # e.g. "a PNG image", "NIfTI-1", "empty (0 bytes)"
    fix: str
    gzip_error: str | None = None


def is_nifti_header(head: bytes) -> str | None:
    """``"NIfTI-1"``/``"NIfTI-2"`` when ``head`` starts with such a header, else None.

    Checks ``sizeof_hdr`` (348 or 540, either byte order) and the magic string, which is
    what tells NIfTI from its Analyze 7.5 ancestor.
    """
    if len(head) >= NIFTI1_HEADER:
        for order in "<>":
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == NIFTI1_HEADER and head[344:347] in (b"n+1", b"ni1"):
                return "NIfTI-1"
    if len(head) >= _NIFTI2_MAGIC_END:
        for order in "<>":
            size = struct.unpack(f"{order}i", head[:4])[0]
            if size == NIFTI2_HEADER and head[4:7] in (b"n+2", b"ni2"):
                return "NIfTI-2"
    return None


def _is_analyze(head: bytes) -> bool:
    return len(head) >= NIFTI1_HEADER and any(
        struct.unpack(f"{o}i", head[:4])[0] == NIFTI1_HEADER for o in "<>"
    )


def kind_of_bytes(head: bytes) -> tuple[str, str] | None:
    """(name, fix) of a known non-NIfTI format, or None."""
    for offset, magic, name, fix in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name, fix
    if head and _is_analyze(head):
        return (
            "an Analyze 7.5 header (no NIfTI magic)",
            "convert it to NIfTI with its real orientation (e.g. `nibabel` or `fslchfiletype`)",
        )
    if head and all(b in _TEXT_BYTES for b in head[:512]):
        return "a text file", "replace it with the scan itself"
    return None


def _gunzip_head(blob: bytes, whole: bool) -> tuple[bytes, str | None]:
    """The first bytes of a gzip stream, and the decoder's complaint if it has one.

    ``whole``: ``blob`` is the entire file, so a stream that has not ended is cut short.
    """
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        inner = decoder.decompress(blob, _HEAD)
    except zlib.error as err:
        return b"", str(err)
    if whole and not decoder.eof and len(inner) < _HEAD and not decoder.unconsumed_tail:
        return inner, f"the stream is cut short after {len(inner)} bytes of content"
    return inner, None


def sniff(path: Path) -> FileKind:
    """Identify a file by content. Raises OSError when it cannot be read at all."""
    size = path.stat().st_size
    if size == 0:
        return FileKind(
            0, False, False, "empty (0 bytes)", "copy or export the scan again; it holds no data"
        )
    with path.open("rb") as fh:
        head = fh.read(64 * 1024)
    if head[:2] == GZIP_MAGIC:
        inner, error = _gunzip_head(head, whole=len(head) == size)
        found = is_nifti_header(inner)
        if found:
            return FileKind(size, True, True, found, "")
        if error:
            return FileKind(
                size,
                True,
                False,
                "a gzip stream that cannot be decompressed",
                "download or export the file again; `gzip -t FILE` confirms the damage",
                error,
            )
        kind = kind_of_bytes(inner)
        if kind is None and len(inner) < NIFTI1_HEADER:
            kind = (
                f"{len(inner)} bytes, too few for a NIfTI header (348)",
                "download or export the file again",
            )
        name, fix = kind or (
            "data of an unknown format",
            "convert the scan to NIfTI (e.g. dcm2niix, SimpleITK)",
        )
        return FileKind(
            size, True, False, f"a gzip stream whose content is not NIfTI but {name}", fix
        )
    found = is_nifti_header(head)
    if found:
        return FileKind(size, False, True, found, "")
    kind = kind_of_bytes(head)
    name, fix = kind or (
        "not NIfTI (no NIfTI-1 or NIfTI-2 header, and no other format recognised)",
        "convert the scan to NIfTI (e.g. dcm2niix, SimpleITK) or download it again",
    )
    return FileKind(size, False, False, name, fix)
