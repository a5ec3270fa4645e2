"""CUDA check of the detector: a few hundred mixed-precision training steps and inference throughput.

    python bench/gpu_check.py [--steps 300] [--batch-size 64] [--dtype bf16|fp16] [--json OUT]

Without a CUDA device it prints "SKIP: ..." and exits 0 (nothing to check here). With one it

* trains the multitask network for ``--steps`` steps under ``torch.autocast`` (bf16, or fp16 with
  a GradScaler) through the real loss on random-phantom batches, checks the loss stays finite and
  decreases, and reports steps/s and slices/s;
* measures ``Detector.score`` throughput (all 20 test-time transforms) in fp32 and the bare
  encoder/decoder forward throughput under autocast, in slices/s;
* measures the bundled default detector's ``Detector.score`` throughput in fp32 (as the node
  runs it, with its own test-time passes), in slices/s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage_model import losses, pretext  # noqa: E402
from triage_model.checkpoint import Detector, load_detector, make_checkpoint  # noqa: E402
from triage_model.network import MultitaskVAE, NetConfig  # noqa: E402
from triage_model.train import SliceSet, random_slices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="exercise the same code on the CPU with bf16 autocast (logic check only)")
    a = ap.parse_args(argv)
    if a.dry_run_cpu:
        a.dtype = "bf16"
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("SKIP: no CUDA device available (torch.cuda.is_available() is False); "
              "nothing measured")
        return 0
    else:
        dev = torch.device("cuda")
    kind = dev.type

    def sync() -> None:
        if kind == "cuda":
            torch.cuda.synchronize()

    def score_rate(det: Detector, xs: SliceSet) -> float:
        """``Detector.score`` slices/s over ``xs`` (fp32, as the node runs it), after a warm-up."""
        det.score(xs.x[:64], xs.brain[:64])
        sync()
        t0 = time.perf_counter()
        det.score(xs.x, xs.brain, batch_size=128)
        sync()
        return len(xs) / (time.perf_counter() - t0)

    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    torch.backends.cudnn.benchmark = True
    cfg = NetConfig(input_size=a.input_size)
    net = MultitaskVAE(cfg).to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=5e-4)
    scaler = torch.amp.GradScaler(kind, enabled=a.dtype == "fp16")
    n_data = 512 if kind == "cuda" else 64
    data = random_slices(n_data, a.input_size, seed=0)
    x_all = torch.from_numpy(data.x).to(dev)
    gen = torch.Generator().manual_seed(0)
    hist = []

    def step() -> float:
        idx = torch.randint(0, len(data), (a.batch_size,), generator=gen).to(dev)
        lab = pretext.random_labels(a.batch_size, gen).to(dev)
        xt = pretext.apply_transforms(x_all[idx], lab).unsqueeze(1)
        with torch.autocast(kind, dtype=dt):
            out = net(xt)
            t = losses.multitask_loss(out, xt, lab, eps=0.05, beta=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(t["loss"]).backward()
        scaler.step(opt)
        scaler.update()
        return float(t["loss"].detach())

    for _ in range(10 if kind == "cuda" else 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        hist.append(step())
    sync()
    dt_train = time.perf_counter() - t0
    finite = all(math.isfinite(v) for v in hist)
    first, last = sum(hist[:20]) / 20, sum(hist[-20:]) / 20

    det = Detector(make_checkpoint("multitask", net=net.cpu()), device=dev)
    xs = random_slices(1024 if kind == "cuda" else 16, a.input_size, seed=1)
    infer = score_rate(det, xs)

    net_d = det.net
    assert net_d is not None
    nb = 128 if kind == "cuda" else 4
    xb = torch.rand(nb, 1, a.input_size, a.input_size, device=dev)
    views = torch.rand(nb * 20, 1, a.input_size, a.input_size, device=dev)
    with torch.inference_mode(), torch.autocast(kind, dtype=dt):
        for _ in range(3):
            net_d(xb, sample=False)
            net_d(views, sample=False, decode=False)
        sync()
        t0 = time.perf_counter()
        for _ in range(8):
            net_d(xb, sample=False)
            net_d(views, sample=False, decode=False)
        sync()
    bare = 8 * nb / (time.perf_counter() - t0)

    # the bundled default (the node's model), fp32 as the node runs it, with its test-time passes
    bundled = load_detector(None, device=str(dev))
    infer_bundled = score_rate(bundled, xs)

    res = {
        "device": torch.cuda.get_device_name(0) if kind == "cuda" else "cpu (dry run)", "dtype": a.dtype, "torch": str(torch.__version__),
        "train_steps": a.steps, "batch_size": a.batch_size,
        "train_steps_per_s": a.steps / dt_train, "train_slices_per_s": a.steps * a.batch_size / dt_train,
        "loss_first20": first, "loss_last20": last, "loss_finite": finite,
        "infer_fp32_slices_per_s_20_transforms": infer,
        "infer_bare_amp_slices_per_s_20_transforms": bare,
        "infer_bundled_name": bundled.name,
        "infer_bundled_fp32_slices_per_s": infer_bundled,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if kind == "cuda" else 0.0,
    }
    for k, v in res.items():
        print(f"{k:<42} {v:.3f}" if isinstance(v, float) else f"{k:<42} {v}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    ok = finite and last < first
    if not ok:
        print("FAIL: loss not finite or not decreasing", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
