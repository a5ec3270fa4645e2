"""Detector throughput on this machine, each figure next to a bare loop of the same network.

    python bench/model.py [--threads 2] [--batch-size 32] [--score-batch-size 8] [--steps 20] [--weights CKPT]

Training runs at ``--batch-size``; scoring (inference, the path comparison) at ``--score-batch-size``,
by default the node's ``[model] batch_size``: the reference path is slower per slice at 32 than at 8
on a 2-vCPU machine, so a larger scoring batch than the node's flatters the other paths.

Prints, in one run:

* training slices/s of the real training step (``triage_model.train.Trainer.step``: batch sampling,
  flip augmentation, patch swap or random geometric transforms, loss, backward, Adam) for the
  pretraining and the multitask phase of the seed paper's model, and for the denoising U-Net
  (coarse noise), each next to a bare forward/backward/Adam loop of the same network on random
  tensors already in memory, and the ratio (1.0 = the data pipeline costs nothing);
* inference slices/s of ``Detector.score`` for the multitask model (all 20 test-time transforms
  + reconstruction + residual maps + normalisation) and for the bundled default weights, next
  to the bare forward passes they need (one decode pass, two with ``flip_tta``, plus 20
  encoder/head passes per slice for the multitask model) on random tensors, and the ratio
  (with the symmetry scoring option, the midline fit's own rate too: it is scoring work that
  the bare loop does not do);
* today's path against the fast and the lean path (``triage_model.runtime``): slices/s of
  ``Detector.score`` on the same 40-slice synthetic series, with the reference, the fast and the
  lean runtime timed in turn within each round (so load from other processes hits them alike),
  each one's ratio to today's (the median of the per-round ratios), the engine, the network
  passes per slice and the largest slice-score difference from today's (the lean path runs
  fewer passes, so its scores differ; docs/experiments.md holds its accuracy);
* wall time to score one 40-slice synthetic DICOM series end to end (``score_series``: read,
  preprocess, model), with its parts, on the fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage_model import losses, pretext  # noqa: E402
from triage_model.checkpoint import Detector, load_detector, make_checkpoint  # noqa: E402
from triage_model.network import MultitaskVAE, NetConfig, build_network  # noqa: E402
from triage_model.runtime import LEAN_PASSES, PassPlan  # noqa: E402
from triage_model.symmetry import fit_midline  # noqa: E402
from triage_model.train import TrainConfig, Trainer, random_slices  # noqa: E402


def _time(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _interleaved(fns: list, steps: int, rounds: int) -> np.ndarray:
    """Seconds per call of each of ``fns``, timed in turn within each of ``rounds`` rounds (so
    load from other processes hits them alike): a (rounds, len(fns)) array."""
    per = max(1, steps // rounds)
    return np.array([[_time(fn, per, warmup=1) for fn in fns] for _ in range(rounds)])


def bench_training(cfg_net: NetConfig, batch: int, steps: int, rounds: int = 3) -> dict[str, float]:
    """Real steps of both phases and the bare loop, interleaved over ``rounds`` so that load from
    other processes hits all three alike; the ratios are medians of the per-round ratios."""
    data = random_slices(256, cfg_net.input_size, seed=0, n_series=8)
    cfg = TrainConfig(method="multitask", net=cfg_net, pretrain_steps=10**9, steps=0,
                      batch_size=batch, ckpt_every=0)
    tr = Trainer(cfg, data)
    net = MultitaskVAE(cfg_net).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, cfg_net.input_size, cfg_net.input_size)
    lab = torch.randint(0, 20, (batch,))

    def bare() -> None:
        o = net(x)
        t = losses.multitask_loss(o, x, lab, eps=0.05, beta=0.1)
        opt.zero_grad(set_to_none=True)
        t["loss"].backward()
        opt.step()

    def pre() -> None:
        tr.cfg.pretrain_steps = 10**9
        tr.step()

    def main_phase() -> None:
        tr.cfg.pretrain_steps = 0
        tr.step()

    a = _interleaved([pre, bare, main_phase], steps, rounds)
    return {
        "train_pretrain_slices_per_s": float(batch / np.median(a[:, 0])),
        "train_multitask_slices_per_s": float(batch / np.median(a[:, 2])),
        "train_bare_slices_per_s": float(batch / np.median(a[:, 1])),
        "train_ratio_pretrain": float(np.median(a[:, 1] / a[:, 0])),
        "train_ratio_multitask": float(np.median(a[:, 1] / a[:, 2])),
    }


def bench_training_dae(cfg_net: NetConfig, batch: int, steps: int, rounds: int = 3
                       ) -> dict[str, float]:
    """The denoising U-Net's real step (sampling, flip, coarse noise, loss, backward, Adam)
    against a bare loop of the same network, interleaved as in ``bench_training``."""
    data = random_slices(256, cfg_net.input_size, seed=0, n_series=8)
    cfg = TrainConfig(method="dae", net=cfg_net, steps=10**9, batch_size=batch, ckpt_every=0)
    tr = Trainer(cfg, data)
    net = build_network(tr.cfg.net).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, cfg_net.input_size, cfg_net.input_size)

    def bare() -> None:
        loss = losses.rec_loss(net(x).recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    a = _interleaved([tr.step, bare], steps, rounds)
    return {"train_dae_slices_per_s": float(batch / np.median(a[:, 0])),
            "train_dae_bare_slices_per_s": float(batch / np.median(a[:, 1])),
            "train_ratio_dae": float(np.median(a[:, 1] / a[:, 0]))}


def bench_inference(det: Detector, batch: int, reps: int, prefix: str = "infer"
                    ) -> dict[str, float]:
    s = det.input_size
    data = random_slices(batch * 2, s, seed=1)
    n = len(data)
    t = _time(lambda: det.score(data.x, data.brain, batch_size=batch), reps, warmup=1)
    out = {f"{prefix}_slices_per_s": n / t}
    net = det.net
    assert net is not None
    xb = torch.rand(batch, 1, s, s)
    views = torch.rand(batch * pretext.N_TRANSFORMS, 1, s, s)

    decodes = 2 if det.scoring.flip_tta else 1  # the mirrored slice's pass (flip_tta)

    @torch.inference_mode()
    def bare() -> None:
        for _ in range(n // batch):
            for _ in range(decodes):
                net(xb, sample=False, decode=True)
            if det.uses["geo"]:
                net(views, sample=False, decode=False)

    out[f"{prefix}_bare_slices_per_s"] = n / _time(bare, reps, warmup=1)
    out[f"{prefix}_ratio"] = out[f"{prefix}_slices_per_s"] / out[f"{prefix}_bare_slices_per_s"]
    if det.scoring.symmetry:  # part of the scoring above, not of the bare loop: its own rate
        x = torch.from_numpy(data.x)
        out[f"{prefix}_midline_fit_slices_per_s"] = n / _time(
            lambda: [fit_midline(x[i:i + batch]) for i in range(0, n, batch)], reps, warmup=1)
    return out


def _bench_case(n_slices: int = 40, matrix: int = 512):  # noqa: ANN202 - a synth Case
    from triage_model.synth import make_case

    case = make_case(4242, "normal", matrix=matrix)
    z = case.hu.shape[0]
    a = max(0, (z - n_slices) // 2)
    case.hu, case.lesion_mask = case.hu[a:a + n_slices], case.lesion_mask[a:a + n_slices]
    return case


def bench_paths(ref: Detector, fast: Detector, rounds: int, batch: int, n_slices: int = 40,
                matrix: int = 512, lean: Detector | None = None) -> dict[str, object]:
    """Today's path (``runtime="reference"``) against the fast path (and the lean one) on the
    slices of the bench series, interleaved: each round scores the series once with each, in
    turn."""
    from triage_agent.preprocess import model_inputs, read_series
    from triage_agent.synth_dicom import write_case_dicom

    with tempfile.TemporaryDirectory() as d:
        mi = model_inputs(read_series(write_case_dicom(_bench_case(n_slices, matrix), Path(d),
                                                       write_mask=False)), size=ref.input_size)
    n = int(mi.x.shape[0])
    dets = {"today": ref, "fast": fast, **({"lean": lean} if lean is not None else {})}
    setup = {}
    for k in list(dets)[1:]:
        t0 = time.perf_counter()
        with torch.inference_mode():  # builds the path (ONNX export and session) once
            dets[k].reconstruct(torch.zeros(1, 1, ref.input_size, ref.input_size))
        setup[k] = time.perf_counter() - t0
    outs = {k: det.score(mi.x, mi.brain, batch_size=batch) for k, det in dets.items()}  # warm-up
    times = np.array([[_time(lambda det=det: det.score(mi.x, mi.brain, batch_size=batch), 1,
                             warmup=0) for det in dets.values()] for _ in range(rounds)])
    res: dict[str, object] = {"paths_slices": n, "paths_rounds": rounds,
                              "paths_today_slices_per_s": float(n / np.median(times[:, 0])),
                              "paths_today_passes": _passes(ref, full=True)}
    for j, k in enumerate(dets):
        if k == "today":
            continue
        res.update({f"paths_{k}_slices_per_s": float(n / np.median(times[:, j])),
                    f"paths_{k}_ratio": float(np.median(times[:, 0] / times[:, j])),
                    f"paths_{k}_engine": str(dets[k].engine),
                    f"paths_{k}_passes": _passes(dets[k], full=k == "fast"),
                    f"paths_{k}_setup_s": setup[k],
                    f"paths_{k}_max_score_diff":
                        float(np.abs(outs["today"].score - outs[k].score).max()),
                    f"paths_{k}_max_heatmap_diff":
                        float(np.abs(outs["today"].heatmap - outs[k].heatmap).max())})
    return res


def _passes(det: Detector, full: bool) -> int:
    """Network passes per slice: every member on each test-time view, or the lean plan's."""
    members = len(getattr(det.net, "members", [None]))
    if full or members == 1:
        return members * (2 if det.scoring.flip_tta else 1)
    plan = LEAN_PASSES if det.scoring.flip_tta else PassPlan(LEAN_PASSES.plain, ())
    return plan.passes(members)


def bench_series(det: Detector, n_slices: int = 40, matrix: int = 512) -> dict[str, float]:
    try:
        from triage_agent.inference import score_series
        from triage_agent.synth_dicom import write_case_dicom
    except ImportError as e:  # pragma: no cover
        return {"series_error": f"synthetic DICOM writer unavailable: {e}"}  # type: ignore[dict-item]
    case = _bench_case(n_slices, matrix)
    with tempfile.TemporaryDirectory() as d:
        paths = write_case_dicom(case, Path(d), write_mask=False)
        score_series(paths, det)  # warm-up
        t0 = time.perf_counter()
        res = score_series(paths, det)
        wall = time.perf_counter() - t0
    return {"series_slices_in": len(paths), "series_slices_scored": len(res.slices),
            "series_matrix": matrix, "series_wall_s": wall,
            **{f"series_{k}": v for k, v in res.timings.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    ap.add_argument("--score-batch-size", type=int, default=None,
                    help="slices per scoring call for inference and the path comparison "
                         "(default: the node's [model] batch_size)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weights", type=Path, default=None,
                    help="checkpoint for inference (default: bundled; else untrained network)")
    ap.add_argument("--no-series", action="store_true",
                    help="skip the end-to-end series and the today's/fast/lean path comparison")
    ap.add_argument("--paths-only", action="store_true",
                    help="only today's path against the fast and the lean path (and the series "
                         "end to end)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds of the today's/fast/lean path comparison")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.score_batch_size is None:
        from triage_agent.config import ModelConfig

        a.score_batch_size = ModelConfig().batch_size
    torch.set_num_threads(a.threads)
    try:
        det = load_detector(a.weights, device="cpu", runtime="reference")
        if det.net is None:
            raise RuntimeError("HU-threshold checkpoint has no network")
    except Exception as e:  # noqa: BLE001
        print(f"(no usable weights: {e}; timing an untrained network)", file=sys.stderr)
        det = Detector(make_checkpoint("multitask", net=MultitaskVAE(NetConfig())), device="cpu")
    cfg_net = det.net.cfg  # type: ignore[union-attr]
    res: dict[str, object] = {"threads": a.threads, "batch_size": a.batch_size,
                              "score_batch_size": a.score_batch_size,
                              "torch": str(torch.__version__), "method": det.method,
                              "load_average_1min": round(os.getloadavg()[0], 2)}
    fast = Detector(det.ckpt, device="cpu", weights_sha256=det.weights_sha256, runtime="fast")
    lean = Detector(det.ckpt, device="cpu", weights_sha256=det.weights_sha256, runtime="lean")
    if a.paths_only:
        res.update(bench_paths(det, fast, a.rounds, a.score_batch_size, lean=lean))
        if not a.no_series:
            res.update(bench_series(fast))
        return _report(res, a.json)
    vae_net = NetConfig(input_size=cfg_net.input_size) if cfg_net.arch != "vae" else \
        NetConfig.from_dict({**cfg_net.to_dict(), "geo_head": True})
    res.update(bench_training(vae_net, a.batch_size, a.steps))
    if cfg_net.arch == "ensemble":  # an ensemble trains member by member: time one member
        dae_net = cfg_net.member_configs()[0]
    elif cfg_net.arch == "unet":
        dae_net = cfg_net
    else:
        dae_net = NetConfig(input_size=cfg_net.input_size)
    res.update(bench_training_dae(dae_net, a.batch_size, a.steps))
    mt = det if det.method == "multitask" else Detector(
        make_checkpoint("multitask", net=MultitaskVAE(vae_net)), device="cpu")
    res.update(bench_inference(mt, a.score_batch_size, a.reps, prefix="infer_multitask"))
    if det is not mt:
        res.update(bench_inference(det, a.score_batch_size, a.reps, prefix=f"infer_{det.method}"))
    if not a.no_series:
        res.update(bench_paths(det, fast, a.rounds, a.score_batch_size, lean=lean))
        res.update(bench_series(fast))
    return _report(res, a.json)


def _report(res: dict[str, object], path: Path | None) -> int:
    res["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    w = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{w}}  {v:.3g}" if isinstance(v, float) and abs(v) < 0.01 else
              f"{k:<{w}}  {v:.3f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    if path:
        path.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
