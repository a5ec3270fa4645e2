"""Normals from the PACS: C-FIND and C-GET against a real Orthanc, one folder per accepted
series, a clear line for every skipped series and for a study the PACS does not have."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from triage_model.synth import make_case

from tests.conftest import storescu
from tests.factories import CANARY_ID, CANARY_NAME, make_series
from tests.peers import Orthanc
from triage_agent.config import AgentConfig, DestinationConfig, OnboardingConfig
from triage_agent.ingest import short_id
from triage_agent.retrieve import RetrieveError, pacs_for, read_studies, retrieve_normals
from triage_agent.synth_dicom import write_case_dicom

UNKNOWN_UID = "1.2.826.0.1.3680043.8.498.999999999"


def _orthanc(tmp: Path, allowed_ae: str) -> Orthanc:
    """Orthanc that knows ``allowed_ae`` as a query/retrieve peer (C-FIND and C-GET) and no
    other: a PACS as a site configures it for the node."""
    o = Orthanc(tmp)
    cfg = json.loads(o.config.read_text())
    cfg["DicomModalities"] = {"triage": {"AET": allowed_ae, "Host": "127.0.0.1", "Port": 1,
                                         "AllowFind": True, "AllowGet": True, "AllowMove": False,
                                         "AllowStore": True, "AllowEcho": True}}
    o.config.write_text(json.dumps(cfg))
    return o.start()


def _cfg(o: Orthanc, ae: str = "TRIAGE") -> AgentConfig:
    pacs = DestinationConfig(name="pacs", ae_title=o.aet, host="127.0.0.1", port=o.port)
    return AgentConfig.model_validate({"node": {"ae_title": ae},
                                       "destinations": [pacs.model_dump()]})


def test_retrieve_by_uid_and_accession_with_a_clear_error_for_an_unknown_study(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    o = _orthanc(tmp_path / "orthanc", "TRIAGE")
    try:
        files, heads = [], []
        for seed in (31, 32):
            head = write_case_dicom(make_case(seed, "normal", matrix=64), tmp_path / f"h{seed}",
                                    patient_name=CANARY_NAME, patient_id=CANARY_ID)
            heads.append(pydicom.dcmread(head[0], stop_before_pixels=True))
            files += head
        # beside the first head: a coronal reformat (fetched, then refused by the rules) and a
        # scout (refused from the C-FIND answer, never fetched)
        study1 = str(heads[0].StudyInstanceUID)
        files += make_series(tmp_path / "cor", n=4, seed=5, size=32, orientation="coronal",
                             study_uid=study1)
        files += make_series(tmp_path / "scout", n=2, seed=6, size=32, description="SCOUT",
                             study_uid=study1)
        assert storescu(o.port, files, called=o.aet).returncode == 0

        studies = tmp_path / "studies.csv"
        studies.write_text(f"StudyInstanceUID\n{study1}\n{UNKNOWN_UID}\n"
                           f"{heads[1].AccessionNumber}\n")
        out = tmp_path / "normals"
        got = retrieve_normals(_cfg(o), studies, out, progress=False)
        printed = capsys.readouterr()
    finally:
        o.stop()

    want = {str(h.SeriesInstanceUID) for h in heads}
    assert {p.name for p in got} == want and all(p.parent == out for p in got)
    for p, h in zip(sorted(got), sorted(heads, key=lambda h: str(h.SeriesInstanceUID)),
                    strict=True):
        sent = sorted((tmp_path / f"h{31 if h is heads[0] else 32}").glob("*.dcm"))
        got_files = sorted(p.glob("*.dcm"))
        assert len(got_files) == len(sent)
        assert {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
                for f in got_files} == {str(h.SeriesInstanceUID)}
    assert sorted(x.name for x in out.iterdir()) == sorted(want)  # skipped series not kept
    text = printed.out + printed.err
    assert f"error: line 3 (study {short_id(UNKNOWN_UID)}): study not found on the PACS" \
        in printed.err
    assert "coronal reformat" in text and "series description matches exclusion" in text
    assert "2 series from 2 of 3 studies" in printed.out
    for secret in (CANARY_NAME, CANARY_ID, str(heads[1].AccessionNumber)):
        assert secret not in text


def test_a_pacs_that_refuses_our_ae_title_says_so(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    o = _orthanc(tmp_path / "orthanc", "SOMEONE")
    try:
        studies = tmp_path / "s.csv"
        studies.write_text("1.2.3.4\n")
        assert retrieve_normals(_cfg(o), studies, tmp_path / "out", progress=False) == []
    finally:
        o.stop()
    err = capsys.readouterr().err
    assert "error: line 1" in err and "allow C-FIND for the AE title 'TRIAGE'" in err, err


def test_study_list_and_pacs_choice(tmp_path: Path) -> None:
    f = tmp_path / "s.csv"
    f.write_text("\ufeffAccessionNumber,comment\n1.2.840.1234.5,x\n\n# a note\nA12345\n"
                 "\"20261203\"\n")
    refs = read_studies(f)
    assert [(r.line, r.kind, r.value) for r in refs] == [
        (2, "uid", "1.2.840.1234.5"), (5, "accession", "A12345"), (6, "accession", "20261203")]
    f.write_text("THIS-IS-NOT-AN-ACCESSION-NUMBER\n")
    with pytest.raises(RetrieveError, match="line 1: neither a StudyInstanceUID"):
        read_studies(f)
    with pytest.raises(RetrieveError, match="no PACS configured"):
        pacs_for(AgentConfig())
    a = DestinationConfig(name="router", ae_title="R", host="h", port=1)
    b = DestinationConfig(name="pacs", ae_title="P", host="h", port=2)
    cfg = AgentConfig(destinations=[a, b])
    assert pacs_for(cfg) == a
    assert pacs_for(cfg.model_copy(update={"onboarding": OnboardingConfig(pacs="pacs")})) == b
    with pytest.raises(RetrieveError, match="names no \\[\\[destinations\\]\\] entry"):
        pacs_for(cfg.model_copy(update={"onboarding": OnboardingConfig(pacs="vna")}))
