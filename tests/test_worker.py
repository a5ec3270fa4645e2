"""The queue worker runs the detector: storescu -> complete -> queued -> scored, visible in status."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pydicom
from sqlalchemy import select
from triage_model.checkpoint import load_detector
from triage_model.synth import make_case

from tests.conftest import Node, storescu
from tests.factories import make_series
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.models import Event, Job, Output, Result, SliceScore
from triage_agent.synth_dicom import write_case_dicom


def test_worker_scores_series_and_status_shows_verdict(
    node_factory, tiny_ckpt: Path, tmp_path: Path  # noqa: F811
) -> None:
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)}
    ).start()
    head = write_case_dicom(make_case(11, "normal", matrix=128), tmp_path / "head")
    noise = make_series(tmp_path / "noise", n=25, seed=12, size=64)  # no head in it
    assert storescu(node.port, head + noise).returncode == 0
    head_uid = pydicom.dcmread(head[0]).SeriesInstanceUID
    noise_uid = pydicom.dcmread(noise[0]).SeriesInstanceUID

    rec = node.wait_state(head_uid, {"scored"}, timeout_s=60)
    det = load_detector(tiny_ckpt, device="cpu")
    assert rec["verdict"] in ("normal", "abnormal")
    assert isinstance(rec["score"], float)
    assert (rec["verdict"] == "abnormal") == (rec["score"] > rec["threshold"])
    with node.session()() as s:
        res = s.scalars(select(Result).where(Result.verdict != "not_assessable")).one()
        assert res.weights_sha256 == det.weights_sha256 and res.model_version == det.version
        for key in ("last_instance_received", "series_complete", "job_claimed",
                    "inference_done", "inference_s", "outputs_built"):
            assert key in res.timings
        slices = s.scalars(select(SliceScore).where(SliceScore.result_id == res.id)).all()
        sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in head}
        assert slices and {sl.sop_instance_uid for sl in slices} <= sops
        assert max(sl.score for sl in slices) == res.score

    rec = node.wait_state(noise_uid, {"scored"}, timeout_s=60)
    assert rec["verdict"] == "not_assessable" and rec["score"] is None
    with node.session()() as s:
        jobs = s.scalars(select(Job)).all()
        failures = [e.detail for e in s.scalars(select(Event).where(Event.kind == "job_failed"))]
        assert all(j.state == "done" and j.attempts == 1 for j in jobs), (
            [(j.state, j.attempts) for j in jobs], failures)


def _wait_warm(node: Node, timeout_s: float = 120.0) -> None:
    """Until the node's workers have built the model and loaded the output builders."""
    deadline = time.monotonic() + timeout_s
    while "output builders ready" not in node.log_path.read_text():
        assert time.monotonic() < deadline, node.log_path.read_text()[-2000:]
        time.sleep(0.2)


def test_serve_with_missing_weights_says_which_setting(node_factory, tmp_path: Path) -> None:
    node: Node = node_factory(worker={"count": 1}, model={"weights": str(tmp_path / "no.pt")})
    try:
        node.start(timeout_s=30)
        raise AssertionError("node started without its model")
    except RuntimeError as e:
        assert "[model] weights" in str(e) and "no.pt" in str(e)


def test_late_slices_give_a_superseding_sr(node_factory, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        series={"min_slices": 10, "quiet_period_s": 3.0},  # one transfer is one generation
    ).start()
    files = sorted(write_case_dicom(make_case(13, "normal", matrix=128), tmp_path / "head"))
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    _wait_warm(node)  # a loaded machine's start-up could stall the transfer past the quiet period
    assert storescu(node.port, files[:-4]).returncode == 0
    node.wait_state(uid, {"scored"}, timeout_s=60)
    assert storescu(node.port, files[-4:]).returncode == 0
    node.wait_state(uid, {"receiving", "queued", "processing"}, timeout_s=10)
    node.wait_state(uid, {"scored"}, timeout_s=60)
    with node.session()() as s:
        srs = s.execute(
            select(Output, Job.generation).join(Result, Result.id == Output.result_id)
            .join(Job, Job.id == Result.job_id).where(Output.kind == "sr").order_by(Job.generation)
        ).all()
    assert [g for _, g in srs] == [1, 2]
    first, second = (pydicom.dcmread(node.storage_root / o.path) for o, _ in srs)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    refs = [r.ReferencedSOPInstanceUID for st in second.PredecessorDocumentsSequence
            for se in st.ReferencedSeriesSequence for r in se.ReferencedSOPSequence]
    assert refs == [first.SOPInstanceUID]


def test_rebuilding_outputs_of_a_job_gives_identical_objects(tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    import datetime as dt

    from triage_agent.app import Model
    from triage_agent.config import AgentConfig
    from triage_agent.inference import score_series
    from triage_agent.publish import build_outputs
    from triage_agent.storage import Storage

    det = load_detector(tiny_ckpt, device="cpu")
    files = write_case_dicom(make_case(14, "subdural_haematoma", matrix=128), tmp_path / "h")
    res = score_series(files, det, threshold=-1e9)  # force "abnormal" so the SC path runs too
    assert res.verdict == "abnormal"
    model = Model(det.name, det.version, det.weights_sha256, det)
    when = dt.datetime(2026, 11, 26, 12, 0, 0)
    built = []
    for run in range(2):
        storage = Storage(tmp_path / f"st{run}")
        outs = build_outputs(cfg=AgentConfig(), storage=storage, source_paths=files, result=res,
                             model=model, uid_key="1.2.3/1/abc", supersedes_path=None,
                             priority="urgent", content_datetime=when)
        built.append([(o.kind, o.sop_instance_uid, (storage.root / o.relpath).read_bytes())
                      for o in outs])
    assert [k for k, _, _ in built[0]] == ["sr"] + ["sc"] * 5
    assert built[0] == built[1]


def test_shadow_mode_scores_and_stores_but_delivers_nothing(
    node_factory, tiny_ckpt: Path, tmp_path: Path  # noqa: F811
) -> None:
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        triage={"mode": "shadow", "threshold": -1.0e9},
        delivery={"interval_s": 0.2},
    )
    node.add_destination("pacs", "PACS", "127.0.0.1", 9)  # would fail loudly if ever used
    node.start(timeout_s=120)
    files = write_case_dicom(make_case(15, "normal", matrix=128), tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    rec = node.wait_state(pydicom.dcmread(files[0]).SeriesInstanceUID, {"scored"}, timeout_s=60)
    assert rec["verdict"] == "abnormal" and rec["deliveries"] == []
    with node.session()() as s:
        outputs = s.scalars(select(Output)).all()
        assert sorted(o.kind for o in outputs) == ["sc"] * 5 + ["sr"]  # built and kept
        assert all((node.storage_root / o.path).exists() for o in outputs)
    time.sleep(1.0)  # several delivery ticks: still nothing sent, state stays scored
    assert node.wait_state(rec["series_instance_uid"], {"scored"}, 5)["deliveries"] == []


def test_default_worker_count_is_one_per_usable_core(tmp_path: Path) -> None:
    """A burst of series is scored side by side: `serve` without [worker] count starts one
    scoring worker per CPU core it may use; the shipped agent.toml leaves the default."""
    import os

    from tests.conftest import REPO
    from triage_agent.config import load_config

    (tmp_path / "agent.toml").write_text("[storage]\nroot = \"store\"\n")
    cores = len(os.sched_getaffinity(0))
    assert load_config(tmp_path / "agent.toml").worker.count == min(64, cores)
    assert load_config(REPO / "agent.toml").worker.count == min(64, cores)


def test_idle_worker_claims_a_completed_series_at_once_not_at_its_next_poll(
    node_factory, tiny_ckpt: Path, tmp_path: Path  # noqa: F811
) -> None:
    """A series is scored as soon as it is complete: the completion sweep wakes the idle
    workers of its process, so even a long [worker] poll_interval_s adds no wait."""
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 120.0}, model={"weights": str(tiny_ckpt)}
    ).start(timeout_s=120)
    files = write_case_dicom(make_case(16, "normal", matrix=128), tmp_path / "s")
    _wait_warm(node)
    time.sleep(1.0)  # the worker has found the queue empty and sleeps until its next poll
    assert storescu(node.port, files).returncode == 0
    node.wait_state(pydicom.dcmread(files[0]).SeriesInstanceUID, {"scored"}, timeout_s=90)
    with node.session()() as s:
        t = s.scalars(select(Result)).one().timings
    waited = (datetime.fromisoformat(t["job_claimed"].rstrip("Z"))
              - datetime.fromisoformat(t["series_complete"].rstrip("Z"))).total_seconds()
    assert waited < 10.0, t
