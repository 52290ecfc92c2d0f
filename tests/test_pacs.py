"""A PACS as an inbox (issue 14): a real Orthanc with its DICOMweb plugin, nothing mocked.

The real DICOM series (../shared/data/real-dicom) had its UIDs blanked by anonymisation
and Orthanc refuses such instances ("missing StudyInstanceUID, SeriesInstanceUID or
SOPInstanceUID"). The tests therefore give it fresh, consistent UIDs with pydicom first,
as a de-identification pipeline that keeps UIDs does, then send it with STOW-RS.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO, assign_uids, copy_runs, free_port

from liverpipe.errors import LiverpipeError
from liverpipe.ops.pacs import (
    Pacs,
    PacsError,
    PacsLedger,
    PollResult,
    RemoteSeries,
    _Poll,
    poll_pacs,
    series_to_predict,
)

SERIES = REPO.parent / "shared" / "data" / "real-dicom" / "series"
TINY = REPO / "configs" / "tiny.toml"


def _slices(study: str, keep: int = 20, modality: str = "CT") -> list[pydicom.Dataset]:
    """The real series (sorted head to foot), its first ``keep`` slices, with fresh UIDs."""
    if not SERIES.is_dir():
        pytest.fail(f"the real DICOM fixture is missing at {SERIES}; the repo expects ../shared")
    series = pydicom.uid.generate_uid()
    slices = sorted(
        (pydicom.dcmread(p) for p in SERIES.iterdir()),
        key=lambda ds: -float(ds.ImagePositionPatient[2]),
    )[:keep]
    for ds in slices:
        assign_uids(ds, study, series)
        ds.Modality = modality
    return slices


def _send(url: str, slices: list[pydicom.Dataset]) -> str:
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(url).store_instances(slices)
    return str(slices[0].SeriesInstanceUID)


def _segs(url: str, study: str) -> list[pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient

    found = DICOMwebClient(url).search_for_series(
        study_instance_uid=study, search_filters={"Modality": "SEG"}
    )
    return [pydicom.Dataset.from_json(item) for item in found]


def test_ingest_polls_orthanc_predicts_each_new_series_once_and_stores_the_seg(
    orthanc: str, tiny_runs_root: Path, tmp_path: Path, prefect_harness: None
) -> None:
    import highdicom as hd
    from dicomweb_client.api import DICOMwebClient

    from flows.ingest import ingest

    study = pydicom.uid.generate_uid()
    ct = _send(orthanc, _slices(study))
    _send(orthanc, _slices(study, modality="MR"))  # not CT: never listed, never predicted
    runs = copy_runs(tiny_runs_root, tmp_path / "runs")
    outputs = tmp_path / "outputs"
    config = tmp_path / "pacs.toml"
    config.write_text(TINY.read_text() + f'\n[ingest]\ndicomweb_url = "{orthanc}"\n')
    params = {
        "inbox": str(tmp_path / "inbox"),
        "store": str(tmp_path / "store.zarr"),
        "runs": str(runs),
        "outputs": str(outputs),
        "config": str(config),
    }

    first = ingest(**params)

    assert first["pacs"]["predicted"] == [ct] and first["pacs"]["stored"] == [ct]
    assert first["pacs"]["found"] == 1 and not first["pacs"]["failed"]
    entry = PacsLedger.load(outputs).entries[ct]
    assert entry["stored"] is True and entry["study"] == study and entry["instances"] == 20
    # The mask lies on the series' own grid.
    mask = nib.load(entry["mask"])
    assert mask.shape == (512, 512, 20)
    # Orthanc lists the SEG in the CT's study, and it references the CT's slices.
    (listed,) = _segs(orthanc, study)
    (seg_file,) = DICOMwebClient(orthanc).retrieve_series(study, listed.SeriesInstanceUID)
    seg = hd.seg.Segmentation.from_dataset(seg_file)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Liver tumour"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
    sources = [str(ds.SOPInstanceUID) for ds in _sorted_instances(orthanc, study, ct)]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, segment_numbers=[1, 2]
    )
    labels = np.asarray(mask.dataobj).transpose(2, 1, 0)  # (slice, row, column)
    np.testing.assert_array_equal(pixels[..., 0] > 0, labels >= 1)
    np.testing.assert_array_equal(pixels[..., 1] > 0, labels == 2)

    again = ingest(**params)  # nothing new: nothing retrieved, predicted or stored twice
    assert again["pacs"]["predicted"] == [] and again["pacs"]["stored"] == []
    assert len(_segs(orthanc, study)) == 1


def _sorted_instances(url: str, study: str, series: str) -> list[pydicom.Dataset]:
    """The series' instances as liverpipe sorts them (head to foot here)."""
    from dicomweb_client.api import DICOMwebClient

    instances = DICOMwebClient(url).retrieve_series(
        study, series, media_types=(("application/dicom", "*"),)
    )
    return sorted(instances, key=lambda ds: float(ds.ImagePositionPatient[2]))


def test_a_bad_series_fails_once_and_is_retried_only_when_it_changes(
    orthanc: str, tiny_runs_root: Path, tmp_path: Path
) -> None:
    """A 2-slice CT (a scout) is refused with its problem, recorded, and not retrieved
    again while its instance count stays; when the rest of its slices arrive it is
    predicted. The other series of the tick go on."""
    study = pydicom.uid.generate_uid()
    slices = _slices(study)
    scout = _send(orthanc, slices[:2])
    good = _send(orthanc, _slices(study))
    runs = copy_runs(tiny_runs_root, tmp_path / "runs")
    outputs = tmp_path / "outputs"
    pacs = Pacs(orthanc)
    messages: list[str] = []

    first = poll_pacs(pacs, runs, outputs, log=messages.append)

    assert first.predicted == [good] and list(first.failed) == [scout]
    assert "fewer than the 3 needed" in first.failed[scout]
    assert any(scout in m and "failed" in m for m in messages)
    assert PacsLedger.load(outputs).entries[scout]["instances"] == 2
    second = poll_pacs(pacs, runs, outputs)
    assert second.predicted == [] and second.failed == {}  # the same 2 slices: not retried
    _send(orthanc, slices[2:])  # the rest of the series arrives
    third = poll_pacs(pacs, runs, outputs)
    assert third.predicted == [scout] and third.stored == [scout]
    assert PacsLedger.load(outputs).entries[scout]["instances"] == 20


def test_a_pacs_that_does_not_answer_names_its_url_and_the_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsError, match="does not answer") as caught:
        Pacs(url, timeout_s=5).ct_series()
    assert url in str(caught.value) and "dicomweb_url" in str(caught.value)
    assert isinstance(caught.value, LiverpipeError)


def test_which_series_a_tick_predicts() -> None:
    """The ledger decides: new, more slices since, a new champion (when asked), and a
    SEG that was predicted but not stored is only stored again."""
    series = [RemoteSeries("s", f"1.{i}", 20) for i in range(5)]
    predicted = {"instances": 20, "mask": "m", "model_version": {"run_ids": ["old"]}}
    ledger = PacsLedger(
        {
            "1.1": {**predicted, "instances": 12},  # slices still arriving last tick
            "1.2": {**predicted, "seg": "a.seg.dcm", "stored": True},
            "1.3": {**predicted, "seg": "b.seg.dcm", "stored": False},  # STOW failed
            "1.4": {"instances": 20, "error": "2 slices"},
        }
    )
    todo, unstored = series_to_predict(series, ledger, "new", repredict=False)
    assert [(s.series_uid, why) for s, why in todo] == [("1.0", "new"), ("1.1", "changed")]
    assert [s.series_uid for s in unstored] == ["1.3"]
    todo, _ = series_to_predict(series, ledger, "new", repredict=True)
    assert [(s.series_uid, why) for s, why in todo] == [
        ("1.0", "new"),
        ("1.1", "changed"),
        ("1.2", "new champion"),
        ("1.3", "new champion"),
    ]


def test_a_series_the_pacs_cannot_send_is_tried_again_not_recorded_as_bad(
    orthanc: str, tmp_path: Path
) -> None:
    """A retrieval the server refuses (here: a series it does not hold, as when it is
    deleted between the query and the retrieval) is the server's failure, not the
    series': it is reported but not written to the ledger, so the next tick tries again."""
    ghost = RemoteSeries(pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), 20)
    ledger, result = PacsLedger(), PollResult()
    poll = _Poll(Pacs(orthanc), ledger, tmp_path, result, log=lambda _: None)
    assert poll.predict(None, ghost, "new") is False
    assert (
        ghost.series_uid in result.failed and "refused: HTTP 404" in result.failed[ghost.series_uid]
    )
    assert ledger.entries == {}
    todo, _ = series_to_predict([ghost], ledger, "run", repredict=False)
    assert [(s.series_uid, why) for s, why in todo] == [(ghost.series_uid, "new")]
