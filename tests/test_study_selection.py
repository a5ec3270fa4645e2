"""A head-CT study as a scanner sends it (localizer, thin and thick soft-tissue axials, a bone
kernel, a sagittal reformat, a dose report) gets exactly one report, on the series the study
rule chose; every other series is skipped with its reason, and so is a series that arrives
after the report. ``triage-agent score`` applies the same rule to a folder."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from triage_model.synth import make_case

from tests.conftest import Node, storescu, wait_for
from tests.factories import CANARY_ID, CANARY_NAME, make_series
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (fixture)
from triage_agent import db
from triage_agent.cli import main
from triage_agent.completion import sweep
from triage_agent.config import SeriesConfig
from triage_agent.ingest import short_id
from triage_agent.models import Job, Output, Result, Series, SeriesState, Study, utcnow
from triage_agent.selection import SeriesFacts, choose
from triage_agent.synth_dicom import write_case_dicom

FINAL = {"scored", "delivered", "skipped", "failed"}


def _set(files: list[Path], **attrs: Any) -> list[Path]:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(f)
    return files


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def head_study(root: Path) -> tuple[dict[str, list[Path]], str]:
    """The series of one study by role, and the StudyInstanceUID."""
    chosen = write_case_dicom(make_case(61, "normal", matrix=64), root / "thick",
                              patient_name=CANARY_NAME, patient_id=CANARY_ID, write_mask=False)
    study = str(pydicom.dcmread(chosen[0], stop_before_pixels=True).StudyInstanceUID)
    _set(chosen, ConvolutionKernel="H31s")

    def other(name: str, seed: int, **kw: Any) -> list[Path]:
        return make_series(root / name, seed=seed, size=64, study_uid=study, **kw)

    series = {
        "thick": chosen,  # 4 mm soft tissue, 44 slices
        # more images, but 1.25 mm: further from the preferred 5 mm
        "thin": _set(other("thin", 1, n=60, thickness=1.25, description="HEAD 1.25mm"),
                     ConvolutionKernel="H31s"),
        # 5 mm and more images, but a bone kernel
        "bone": _set(other("bone", 2, n=50, thickness=5.0, description="HEAD 5mm"),
                     ConvolutionKernel="H70h"),
        "localizer": other("localizer", 3, n=2, description="LOCALIZER"),
        "sagittal": other("sagittal", 4, n=24, orientation="sagittal", description="SAG"),
        "dose": other("dose", 5, n=1, description="DOSE REPORT"),
    }
    return series, study


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_one_report_per_study_on_the_chosen_series(node_factory: Any, tmp_path: Path,
                                                   tiny_ckpt: Path) -> None:  # noqa: F811
    series, study = head_study(tmp_path / "study")
    # quiet_period_s long enough that a loaded machine's pause inside the association is not
    # taken for the end of the study
    node: Node = node_factory(worker={"count": 1, "poll_interval_s": 0.2},
                              series={"quiet_period_s": 3.0, "sweep_interval_s": 0.2},
                              model={"weights": str(tiny_ckpt)}).start()
    sessions = node.session()

    def states() -> dict[str, str]:
        with sessions() as s:
            return {u: str(st) for u, st in s.execute(
                select(Series.series_instance_uid, Series.state)).all()}

    def reports() -> list[str]:
        with sessions() as s:
            return list(s.scalars(
                select(Series.series_instance_uid)
                .join(Result, Result.series_id == Series.id)
                .join(Output, Output.result_id == Result.id)
                .where(Output.kind == "sr")))

    files = [f for fs in series.values() for f in fs]
    assert storescu(node.port, files).returncode == 0  # the whole study in one association
    wait_for(lambda: len(states()) == 6 and set(states().values()) <= FINAL, 120,
             "every series of the study completed")
    recs = {r["series_instance_uid"]: r for r in node.status()}
    uids = {role: _uid(fs) for role, fs in series.items()}
    assert set(recs) == set(uids.values()), recs
    chosen = f"study {short_id(study)}: series {short_id(uids['thick'])} chosen"
    want = {
        "thin": f"{chosen} (slice thickness 4 mm closer to 5 mm than 1.25 mm)",
        "bone": f"{chosen} (soft-tissue reconstruction preferred over bone/sharp)",
        "localizer": "series description matches exclusion '(?i)localizer'",
        "sagittal": "sagittal reformat",
        "dose": "series description matches exclusion '(?i)dose'",
    }
    assert {role: recs[uids[role]]["reason"] for role in want} == want
    assert all(recs[uids[role]]["state"] == "skipped" for role in want)
    assert recs[uids["thick"]]["state"] in ("scored", "delivered"), recs[uids["thick"]]
    assert reports() == [uids["thick"]]

    # The thick series' 5 mm twin arrives after the report: skipped, still one report.
    late = _set(make_series(tmp_path / "late", seed=9, n=40, size=64, thickness=5.0,
                            study_uid=study), ConvolutionKernel="H31s")
    assert storescu(node.port, late).returncode == 0
    wait_for(lambda: states().get(_uid(late)) in FINAL | {"queued"}, 60, "late series completed")
    text = node.cli("status").stdout
    rec = {r["series_instance_uid"]: r for r in node.status()}[_uid(late)]
    assert rec["state"] == "skipped"
    assert rec["reason"] == f"study already reported on series {short_id(uids['thick'])}"
    assert reports() == [uids["thick"]]

    assert "chosen (soft-tissue reconstruction preferred over bone/sharp)" in text
    for secret in (CANARY_NAME, CANARY_ID):
        assert secret not in text and secret not in node.log_path.read_text()


def test_score_prints_the_series_the_study_rule_skips(tmp_path: Path, tiny_ckpt: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    series, study = head_study(tmp_path / "study")
    args = ["score", str(tmp_path / "study"), "--model", str(tiny_ckpt), "--json",
            "--config", str(tmp_path / "absent.toml")]
    assert main(args) == 0
    out = {d["series_instance_uid"]: d for d in map(
        json.loads, capsys.readouterr().out.strip().splitlines())}
    uids = {role: _uid(fs) for role, fs in series.items()}
    scored = [u for u, d in out.items() if d["verdict"] != "skipped"]
    assert scored == [uids["thick"]]
    assert out[uids["bone"]]["reason"].endswith("(soft-tissue reconstruction preferred over "
                                                "bone/sharp)")

    assert main(args + ["--no-selection"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert not any(d["verdict"] == "skipped" for d in lines) and len(lines) == 6


def _facts(uid: str, **kw: Any) -> SeriesFacts:
    base: dict[str, Any] = dict(modality="CT", body_part="HEAD", series_description="HEAD",
                                instance_count=30, slice_thickness_mm=5.0,
                                orientation="axial:0.0", kernel="STANDARD", series_number=2,
                                study_uid="1.2.3", series_uid=uid)
    return SeriesFacts(**{**base, **kw})


def test_rule_order_and_settings() -> None:
    rules = SeriesConfig()
    cases = [  # (winner, loser, why)
        (_facts("1", kernel="H31s"), _facts("2", kernel="BONEPLUS", instance_count=90),
         "soft-tissue reconstruction preferred over bone/sharp"),
        (_facts("1", kernel="FC21"), _facts("2", kernel="FC35"),
         "soft-tissue reconstruction preferred over bone/sharp"),
        (_facts("1"), _facts("2", series_description="HEAD BONE"),
         "soft-tissue reconstruction preferred over bone/sharp"),
        (_facts("1", slice_thickness_mm=4.0), _facts("2", slice_thickness_mm=0.625),
         "slice thickness 4 mm closer to 5 mm than 0.625 mm"),
        (_facts("1", instance_count=32), _facts("2", instance_count=31),
         "more images (32 vs 31)"),
        (_facts("1", series_number=3), _facts("2", series_number=4), "lower series number"),
        (_facts("1"), _facts("2"), "same rank, first SeriesInstanceUID"),
    ]
    for winner, loser, why in cases:
        for order in ([winner, loser], [loser, winner]):
            best, losers = choose(order, rules)
            assert best == winner and losers == {
                loser.series_uid: f"study {short_id('1.2.3')}: series {short_id('1')} "
                f"chosen ({why})"}, (why, losers)
    thin_first = rules.model_copy(update={"preferred_thickness_mm": 1.0})
    assert choose([_facts("1"), _facts("2", slice_thickness_mm=1.25)], thin_first)[0] \
        .series_uid == "2"
    named = rules.model_copy(update={"prefer_description": ["(?i)brain"]})
    assert choose([_facts("1"), _facts("2", series_description="BRAIN 1.25",
                                        slice_thickness_mm=1.25)], named)[0].series_uid == "2"


def test_completion_waits_for_the_whole_study(db_url: str) -> None:
    url = db_url  # SQLite, and PostgreSQL with its row locks
    db.upgrade(url)
    sessions = db.session_factory(db.make_engine(url))
    old = utcnow() - dt.timedelta(seconds=60)

    def add(s: Any, study: Study, uid: str, at: dt.datetime, **kw: Any) -> None:
        values: dict[str, Any] = dict(modality="CT", body_part="HEAD", series_description="HEAD",
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                      slice_thickness_mm=5.0, orientation="axial:0.0",
                                      instance_count=30, frame_count=30, series_number=2,
                                      convolution_kernel="STANDARD")
        values.update(kw)
        s.add(Series(series_instance_uid=uid, study=study, state=SeriesState.RECEIVING,
                     first_received_at=at, last_received_at=at, **values))

    with sessions() as s, s.begin():
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        add(s, study, "1.2.3.1", old, slice_thickness_mm=0.625, instance_count=200,
            frame_count=200)
        add(s, study, "1.2.3.2", utcnow())  # still arriving
    rules = SeriesConfig(quiet_period_s=10)
    assert sweep(sessions, rules) == 0  # the thin series waits for the study
    with sessions() as s, s.begin():
        s.scalars(select(Series).where(Series.series_instance_uid == "1.2.3.2")).one() \
            .last_received_at = old
    assert sweep(sessions, rules) == 2
    with sessions() as s:
        states = dict(s.execute(select(Series.series_instance_uid, Series.state)).all())
        assert states == {"1.2.3.1": "skipped", "1.2.3.2": "queued"}
        assert s.scalar(select(Series.reason).where(Series.series_instance_uid == "1.2.3.1")) \
            == (f"study {short_id('1.2.3')}: series {short_id('1.2.3.2')} chosen "
                "(slice thickness 5 mm closer to 5 mm than 0.625 mm)")
        assert len(s.scalars(select(Job)).all()) == 1

    # every_eligible_series: each quiet series on its own, whatever the study does
    with sessions() as s, s.begin():
        study2 = Study(study_instance_uid="1.2.4")
        s.add(study2)
        add(s, study2, "1.2.4.1", old)
        add(s, study2, "1.2.4.2", utcnow())
    assert sweep(sessions, rules.model_copy(update={"report": "every_eligible_series"})) == 1
    with sessions() as s:
        assert s.scalar(select(Series.state).where(Series.series_instance_uid == "1.2.4.1")) \
            == "queued"

    # late_series = "score_if_preferred": a late series that the rule ranks above the reported
    # one is scored too (by default it is skipped: the node test)
    with sessions() as s, s.begin():
        study = s.scalars(select(Study).where(Study.study_instance_uid == "1.2.3")).one()
        add(s, study, "1.2.3.3", old, series_number=1)
        add(s, study, "1.2.3.4", old, convolution_kernel="H70h")
    assert sweep(sessions, rules.model_copy(update={"late_series": "score_if_preferred"})) == 2
    with sessions() as s:
        got = dict(s.execute(select(Series.series_instance_uid, Series.reason)
                             .where(Series.series_instance_uid.in_(["1.2.3.3", "1.2.3.4"]))).all())
        assert got == {"1.2.3.3": None,
                       "1.2.3.4": f"study already reported on series {short_id('1.2.3.2')}"}


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_concurrent_sweepers_complete_each_study_once(db_url: str) -> None:
    import threading

    db.upgrade(db_url)
    sessions = db.session_factory(db.make_engine(db_url))
    old = utcnow() - dt.timedelta(seconds=60)
    with sessions() as s, s.begin():
        for k in range(6):
            study = Study(study_instance_uid=f"1.2.5.{k}")
            for j, thickness in enumerate((0.625, 2.5, 5.0)):
                s.add(Series(series_instance_uid=f"1.2.5.{k}.{j}", study=study,
                             state=SeriesState.RECEIVING, modality="CT", body_part="HEAD",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                             slice_thickness_mm=thickness, orientation="axial:0.0",
                             instance_count=40, frame_count=40, first_received_at=old,
                             last_received_at=old))
    rules = SeriesConfig(quiet_period_s=10)
    start = threading.Barrier(4)
    counts: list[int] = []

    def run() -> None:
        start.wait()
        counts.append(sweep(sessions, rules))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(counts) == 18  # every series completed exactly once
    with sessions() as s:
        queued = sorted(s.scalars(select(Series.series_instance_uid)
                                  .join(Job, Job.series_id == Series.id)).all())
    assert queued == [f"1.2.5.{k}.2" for k in range(6)]  # one per study: the 5 mm series
