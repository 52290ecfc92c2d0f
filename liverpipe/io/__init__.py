"""Reading and writing files: NIfTI scans and labels, the MSD dataset layout, DICOM series
in and DICOM-SEG out, and file identity. Knows nothing of grids, models or the store.
"""

from __future__ import annotations

from liverpipe.io.dataset import CaseFiles, DatasetIndex, discover, discover_scans
from liverpipe.io.dicom import DicomSeries, find_series, holds_dicom, read_series, write_nifti
from liverpipe.io.dicom_seg import segment_descriptions, write_seg
from liverpipe.io.identity import FileIdentity, case_identity, folder_identity, unchanged
from liverpipe.io.nifti import (
    NIFTI_SUFFIXES,
    NiftiInfo,
    case_id_of,
    file_sha256,
    is_nifti,
    read_header,
    read_labels_hashed,
    read_voxels,
    read_voxels_hashed,
)
from liverpipe.io.sniff import FileKind, is_nifti_header, kind_of_bytes, sniff

__all__ = [
    "NIFTI_SUFFIXES",
    "CaseFiles",
    "DatasetIndex",
    "DicomSeries",
    "FileIdentity",
    "FileKind",
    "NiftiInfo",
    "case_id_of",
    "case_identity",
    "discover",
    "discover_scans",
    "file_sha256",
    "find_series",
    "folder_identity",
    "holds_dicom",
    "is_nifti",
    "is_nifti_header",
    "kind_of_bytes",
    "read_header",
    "read_labels_hashed",
    "read_series",
    "read_voxels",
    "read_voxels_hashed",
    "segment_descriptions",
    "sniff",
    "unchanged",
    "write_nifti",
    "write_seg",
]
