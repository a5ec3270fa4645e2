"""Tiny end-to-end runs: train -> checkpoint -> load -> score, the score CLI, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from triage_model.checkpoint import CheckpointError, load_detector, sha256_file
from triage_model.network import NetConfig
from triage_model.train import TrainConfig, random_slices, state_path, train

SIZE = 64
TINY = NetConfig(input_size=SIZE, base_channels=4, max_channels=16, z_dim=8, geo_hidden=16)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ck") / "tiny.pt"
    data = random_slices(40, SIZE, seed=0, n_series=8)
    tr, va = data.split(0.25, seed=0)
    cfg = TrainConfig(method="multitask", net=TINY, pretrain_steps=2, steps=3, batch_size=4,
                      ckpt_every=0)
    train(cfg, tr, va, out, progress=False, device="cpu")
    return out


def test_train_then_score(tiny_ckpt: Path):
    det = load_detector(tiny_ckpt, device="cpu")
    assert det.method == "multitask" and det.input_size == SIZE
    assert det.weights_sha256 == sha256_file(tiny_ckpt)
    assert np.isfinite(det.threshold) and det.pixel_threshold is not None
    ck = det.ckpt
    assert ck["training"]["steps"] == 5 and ck["calibration"]["val_series"] == 2
    assert ck["net_config"]["input_size"] == SIZE
    data = random_slices(5, SIZE, seed=3)
    ss = det.score(data.x, data.brain, lambda_=0.5, batch_size=2)
    assert ss.score.shape == ss.s_g.shape == ss.s_r.shape == (5,)
    assert ss.heatmap.shape == (5, SIZE, SIZE) and ss.heatmap.dtype == np.float32
    assert np.all(ss.heatmap[~data.brain] == 0)
    np.testing.assert_allclose(ss.score, 0.5 * ss.s_g + 0.5 * ss.s_r, rtol=1e-5, atol=1e-6)
    only_r = det.score(data.x, data.brain, lambda_=1.0)
    np.testing.assert_allclose(only_r.score, only_r.s_r, rtol=1e-5)
    # normalisation: validation slices of the training run score ~N(0, 1) per term
    val = random_slices(40, SIZE, seed=0, n_series=8).split(0.25, seed=0)[1]
    vs = det.score(val.x, val.brain)
    assert abs(float(vs.s_r.mean())) < 1e-3 and abs(float(vs.s_r.std()) - 1) < 1e-2


def test_checkpoint_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        load_detector(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_detector(bad)
    other = tmp_path / "other.pt"
    torch.save({"hello": 1}, other)
    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        load_detector(other)


def test_resume_continues(tmp_path: Path):
    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=1, n_series=4)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, z_dim=4, geo_hidden=8)
    out = tmp_path / "r.pt"
    cfg = TrainConfig(method="vae", net=net, steps=2, batch_size=2, ckpt_every=1)
    train(cfg, tr, va, out, progress=False, device="cpu")
    assert torch.load(state_path(out), weights_only=False)["step"] == 2
    cfg2 = TrainConfig(method="vae", net=net, steps=4, batch_size=2, ckpt_every=1)
    ck = train(cfg2, tr, va, out, resume=True, progress=False, device="cpu")
    assert ck is not None and torch.load(state_path(out), weights_only=False)["step"] == 4
    with pytest.raises(ValueError, match="method"):
        train(TrainConfig(method="cevae", net=net, steps=5, batch_size=2), tr, va, out,
              resume=True, progress=False, device="cpu")


def test_every_method_scores_through_the_same_interface(tmp_path: Path):
    from triage_model.baselines import load_any_detector
    from triage_model.checkpoint import SHIPPED_METHODS
    from triage_model.options import ALL_METHODS
    from triage_model.train import default_config

    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=2, n_series=4)
    data.hu = data.x * 80.0
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, z_dim=4, geo_hidden=8)
    for m in ALL_METHODS:
        cfg = default_config(m, total_steps=3, batch_size=2, net=net, ckpt_every=0)
        train(cfg, tr, va, tmp_path / f"{m}.pt", progress=False, device="cpu")
        det = load_any_detector(tmp_path / f"{m}.pt", device="cpu")
        ss = det.score(va.x, va.brain, hu=va.hu)
        assert ss.score.shape == (len(va),) and np.isfinite(ss.score).all(), m
        if m in SHIPPED_METHODS:  # the node scores it as evaluation does
            ref = load_detector(tmp_path / f"{m}.pt", device="cpu", runtime="reference")
            assert type(ref) is type(det)
            np.testing.assert_array_equal(ref.score(va.x, va.brain).score, ss.score)
            # The node's default fast path (batched views, ONNX Runtime or channels-last) scores
            # the same up to float rounding.
            node = load_detector(tmp_path / f"{m}.pt", device="cpu")
            np.testing.assert_allclose(node.score(va.x, va.brain).score, ss.score,
                                       rtol=1e-4, atol=1e-4)
        else:  # a research baseline: evaluation only
            with pytest.raises(CheckpointError, match="research baseline.*evaluate"):
                load_detector(tmp_path / f"{m}.pt", device="cpu")


# ------------------------------------------------------------------------------------- DICOM


def _write_phantom_series(folder: Path, n: int = 12, matrix: int = 64, seed: int = 0) -> list[str]:
    """A crude head phantom (skull ring, 30 HU brain) as a CT series with rescale -1024."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    px = 3.5
    yy, xx = (np.mgrid[:matrix, :matrix] - (matrix - 1) / 2) * px
    uids = []
    for k in range(n):
        r = np.hypot(yy / 80, xx / 65)
        hu = np.full((matrix, matrix), -1000.0)
        hu[r < 1.12] = 1200.0
        hu[r < 1.0] = 30.0 + rng.normal(0, 4, (r < 1.0).sum())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "CT"
        ds.Rows = ds.Columns = matrix
        ds.PixelSpacing = [px, px]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.SliceThickness = 5.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.clip(hu + 1024, 0, 65535).astype(np.uint16).tobytes()
        pydicom.dcmwrite(folder / f"{(k * 7) % n:03d}_{k}.dcm", ds, enforce_file_format=True)
        uids.append(sop)
    return uids


def test_score_json_cli(tiny_ckpt: Path, tmp_path: Path, capsys):
    pytest.importorskip("triage_agent.preprocess")
    from triage_agent.cli import main

    # 24 slices: the [series] rules skip series of fewer than 20 (tests/test_score_selection.py)
    a = _write_phantom_series(tmp_path / "in" / "a", n=24)
    b = _write_phantom_series(tmp_path / "in" / "nested" / "b", n=24, seed=1)
    (tmp_path / "in" / "README.txt").write_text("not dicom")
    rc = main(["score", str(tmp_path / "in"), "--model", str(tiny_ckpt), "--json",
               "--config", str(tmp_path / "absent.toml")])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2
    for d in lines:
        assert set(d) >= {"series_instance_uid", "score", "verdict", "threshold", "slices"}
        assert d["verdict"] in ("abnormal", "normal", "not_assessable")
        if d["verdict"] != "not_assessable":
            assert isinstance(d["score"], float) and len(d["slices"]) >= 5
            assert {s["sop_instance_uid"] for s in d["slices"]} <= set(a) | set(b)
            assert all(set(s) == {"sop_instance_uid", "score"} for s in d["slices"])
            assert d["score"] == pytest.approx(max(s["score"] for s in d["slices"]))


def test_score_series_not_assessable(tiny_ckpt: Path, tmp_path: Path):
    pytest.importorskip("triage_agent.preprocess")
    from triage_agent.inference import score_series

    det = load_detector(tiny_ckpt, device="cpu")
    junk = tmp_path / "x.dcm"
    junk.write_bytes(b"junk")
    res = score_series([junk, junk], det)
    assert res.verdict == "not_assessable" and res.score is None and res.reason
    assert res.threshold == det.threshold


def _write_case_repeatedly(path: str, barrier, n: int) -> None:
    from triage_agent.datasets import Case, _save_case

    rng = np.random.default_rng(0)
    c = Case("synth-1-normal", "normal", False, rng.random((6, 32, 32), dtype=np.float32),
             rng.random((6, 32, 32)) > 0.5, None)
    barrier.wait()
    for _ in range(n):
        _save_case(Path(path), c)


def test_case_cache_survives_concurrent_writers(tmp_path: Path):
    """Two evaluate/score jobs sharing a --cache folder may generate the same case at the same
    time. Each writer must finish (a shared temporary name made one rename fail, and the job died
    after an hour's work), and the entry left behind must read back whole."""
    import multiprocessing as mp

    from triage_agent.datasets import _load_case

    path = tmp_path / "synth-normal-seed1-m512-s32-x.npz"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_write_case_repeatedly, args=(str(path), barrier, 60))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    c = _load_case(path)
    assert c.x.shape == (6, 32, 32) and c.label == "normal" and c.lesion is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left over
