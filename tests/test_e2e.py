"""End to end against a real PACS: storescu -> node -> detector -> SR + heat maps -> Orthanc."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from triage_model.checkpoint import load_detector
from triage_model.synth import make_case

from tests.conftest import Node, require_tool, storescu, wait_for
from tests.peers import Orthanc
from triage_agent.inference import score_series
from triage_agent.synth_dicom import write_case_dicom

VERDICT_CODES = {"263654008": "abnormal", "17621005": "normal", "82334004": "not_assessable"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def sr_verdicts(ds: pydicom.Dataset) -> list[str]:
    """Every coded verdict anywhere in the SR content tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        for code in item.get("ConceptCodeSequence", []):
            if code.CodeValue in VERDICT_CODES:
                found.append(VERDICT_CODES[code.CodeValue])
        found += sr_verdicts(item)
    return found


@pytest.fixture
def pacs(tmp_path: Path) -> Any:
    require_tool("Orthanc", "orthanc")
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_results_reach_orthanc_once_and_survive_pacs_outage(
    node_factory: Any, pacs: Orthanc, tmp_path: Path
) -> None:
    cases = {
        "normal": write_case_dicom(make_case(101, "normal", matrix=256), tmp_path / "n"),
        "abnormal": write_case_dicom(
            make_case(202, "intraparenchymal_haemorrhage", subtle=False, matrix=256),
            tmp_path / "a"),
    }
    # The bundled (synthetic-trained demo) model must rank the haemorrhage above the normal
    # head; the node then runs with a site threshold between the two, as `calibrate` would set
    # from a site's own series, so both branches (abnormal with heat maps, normal) run.
    det = load_detector(None, device="cpu")
    scores = {k: score_series(f, det).score for k, f in cases.items()}
    assert scores["abnormal"] > scores["normal"], scores
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2},
        triage={"threshold": (scores["abnormal"] + scores["normal"]) / 2},
        delivery={"backoff_base_s": 0.5, "backoff_cap_s": 2.0, "interval_s": 0.3,
                  "timeout_s": 5.0, "breaker_cooldown_s": 0.5, "breaker_cooldown_cap_s": 1.0},
        destinations=None,
    )
    node.add_destination("PACS", pacs.aet, "127.0.0.1", pacs.port)
    node.start(timeout_s=120)
    for files in cases.values():
        assert storescu(node.port, files).returncode == 0

    def delivered(files: list[Path]) -> dict[str, Any] | None:
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        for rec in node.status():
            if rec["series_instance_uid"] == uid and rec["state"] in ("delivered", "failed"):
                return rec
        return None

    results = {k: wait_for(lambda f=f: delivered(f), 180, f"{k} delivered")
               for k, f in cases.items()}
    for rec in results.values():
        assert rec["state"] == "delivered", rec
        study_uid = rec["study_instance_uid"]
        series = pacs.series_of_study(study_uid)
        srs = [s for s in series if s.get("Modality") == "SR"]
        assert len(srs) == 1 and len(srs[0]["Instances"]) == 1, srs
        sr = pydicom.dcmread(BytesIO(pacs.instance_file(srs[0]["Instances"][0])))
        assert sr.SOPClassUID == SR_CLASS
        assert sr_verdicts(sr) == [rec["verdict"]]
        assert rec["verdict"].upper() in sr.SeriesDescription.upper()
        scs = [s for s in series if s.get("Modality") in ("OT", "SC") or "AI TRIAGE" in
               s.get("SeriesDescription", "") and s.get("Modality") != "SR"]
        if rec["verdict"] == "abnormal":
            assert len(scs) == 1 and scs[0]["Instances"], series
            sc = pydicom.dcmread(BytesIO(pacs.instance_file(scs[0]["Instances"][0])))
            assert sc.SOPClassUID == SC_CLASS and sc.BurnedInAnnotation == "YES"
            assert sc.PatientID == sr.PatientID
        else:
            assert scs == []
    assert results["abnormal"]["verdict"] == "abnormal", results["abnormal"]
    assert results["normal"]["verdict"] == "normal", results["normal"]
    assert abs(results["abnormal"]["score"] - scores["abnormal"]) < 1e-4  # node == score CLI
    n_before = len(pacs.get("/instances"))

    # Resending a study creates no duplicate objects anywhere.
    assert storescu(node.port, cases["abnormal"]).returncode == 0
    time.sleep(4)
    assert len(pacs.get("/instances")) == n_before

    # The PACS goes down during delivery; everything arrives once it is back.
    pacs.stop()
    late = write_case_dicom(make_case(303, "normal", matrix=256), tmp_path / "late")
    assert storescu(node.port, late).returncode == 0
    late_uid = pydicom.dcmread(late[0], stop_before_pixels=True).SeriesInstanceUID

    def retrying() -> bool:
        for rec in node.status():
            if rec["series_instance_uid"] == late_uid and rec.get("deliveries"):
                return any(d["attempts"] >= 2 and d["state"] == "pending"
                           for d in rec["deliveries"])
        return False

    wait_for(retrying, 120, "failed delivery attempts while the PACS is down")
    pacs.start()
    rec = wait_for(lambda: delivered(late), 60, "delivery after the PACS came back")
    assert rec["state"] == "delivered"
    srs = [s for s in pacs.series_of_study(rec["study_instance_uid"]) if s.get("Modality") == "SR"]
    assert len(srs) == 1
