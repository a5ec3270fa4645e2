"""Research run for a lent CUDA machine (thirteenth session, not product code): the spot
training of ``bench/spot_pilot.py`` with the whole corruption drawn on the device, so that one
U-Net member trains at GPU speed.

    python bench/gpu_spot.py OUT.pt --slices train128.npz --member 0 --init bundled --budget 400
    python bench/gpu_spot.py OUT.pt --slices train128.npz --member 0 --init scratch --seed 1000

* ``--init bundled``: start from member K of the bundled ensemble (``model/weights/detector.pt``)
  and fine-tune it, like the eleventh session's CPU fine-tune, only for many more steps.
* ``--init scratch``: the same architecture (member K's ``NetConfig``), freshly initialised
  (``torch.manual_seed(SEED)``), trained on coarse noise + spots from the start.

Corruption per slice: a left-right flip with probability 0.5; the coarse noise of the bundled
members (std 0.3 in window units on a 16 x 16 grid, bilinear, inside the brain mask); plus 2-6
Gaussian spots centred on brain pixels (sigma 0.7-2.0 px, 8-30 HU, 70 % hyperdense, zero outside
the brain; slices with under 50 brain pixels get none). The distributions are those of
``triage_model.pretext.small_spots`` (its constants are used), drawn in one vectorised pass on the
device with a device generator, so not the same draws as the CPU function. The squared error is
weighted 1 + WEIGHT where the spot field exceeds ``pretext.SPOT_WEIGHT_THRESHOLD``. The learning
rate is constant, then falls linearly to 0 over the last ``--decay`` of the time budget.

``--slices``: an npz with ``x`` (N,S,S) uint8 (window x 255), ``brain`` (packbits of (N,S,S)
bool) and ``shape``; the thirteenth session exported the bundled members' 128 training normals
(``make_dataset_plan(160, 0, seed=1000)``, split seed 1000). OUT holds ``cfg``, ``state_dict``,
``steps`` and the recipe; a bare member, not a calibrated checkpoint. A copy ``OUT.half`` is
written at half the budget, so a run cut short still leaves a member.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage_model import losses, pretext  # noqa: E402
from triage_model.checkpoint import default_weights_path, read_checkpoint  # noqa: E402
from triage_model.network import NetConfig, build_network  # noqa: E402


def spots_vectorised(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B,S,S) bool brain -> (B,S,S) additive spot field, the distribution of
    ``pretext.small_spots`` drawn on ``mask``'s device in one pass."""
    b, h, w = mask.shape
    dev = mask.device
    lo_n, hi_n = pretext.SPOT_COUNT
    (lo_s, hi_s), (lo_a, hi_a) = pretext.SPOT_SIGMA_PX, pretext.SPOT_AMPLITUDE
    flat = mask.reshape(b, -1).float()
    ok = flat.sum(1) >= 50
    probs = torch.where(ok[:, None], flat, torch.ones_like(flat))
    idx = torch.multinomial(probs, hi_n, replacement=True, generator=gen)  # (B,K)
    py, px = (idx // w).float(), (idx % w).float()
    count = torch.randint(lo_n, hi_n + 1, (b, 1), generator=gen, device=dev)
    live = (torch.arange(hi_n, device=dev)[None] < count) & ok[:, None]
    sg = lo_s + (hi_s - lo_s) * torch.rand((b, hi_n), generator=gen, device=dev)
    amp = lo_a + (hi_a - lo_a) * torch.rand((b, hi_n), generator=gen, device=dev)
    sign = torch.where(torch.rand((b, hi_n), generator=gen, device=dev) < 1.0 - pretext.SPOT_HYPERDENSE, -1.0, 1.0)
    amp = amp * sign * live.float()
    yy = torch.arange(h, device=dev, dtype=torch.float32).view(1, 1, h, 1)
    xx = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, 1, w)
    d2 = (yy - py[..., None, None]) ** 2 + (xx - px[..., None, None]) ** 2
    f = (amp[..., None, None] * torch.exp(-d2 / (2 * sg[..., None, None] ** 2))).sum(1)
    return f * mask.float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--slices", type=Path, required=True)
    ap.add_argument("--member", type=int, default=0)
    ap.add_argument("--init", choices=["bundled", "scratch"], default="bundled")
    ap.add_argument("--init-file", type=Path, default=None,
                    help="start from a member this script saved (overrides --init)")
    ap.add_argument("--seed", type=int, default=5342)
    ap.add_argument("--budget", type=float, default=400.0, help="seconds of training")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (dry runs)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--decay", type=float, default=0.3, help="final share of the budget with lr -> 0")
    ap.add_argument("--weight", type=float, default=20.0, help="extra loss weight in the spots")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    ck, _ = read_checkpoint(default_weights_path())
    ens_cfg = NetConfig.from_dict(ck["net_config"])
    cfg = ens_cfg.member_configs()[a.member]
    if a.init_file is not None:
        net = build_network(cfg)
        net.load_state_dict(torch.load(a.init_file, weights_only=False)["state_dict"])
    elif a.init == "bundled":
        ensemble = build_network(ens_cfg)
        ensemble.load_state_dict(ck["state_dict"])
        net = ensemble.members[a.member]
    else:
        net = build_network(cfg)
    net = net.to(dev).train()
    z = np.load(a.slices)
    shape = tuple(int(v) for v in z["shape"])
    x_all = torch.from_numpy(z["x"]).to(dev).float().div_(255.0)
    m_all = torch.from_numpy(np.unpackbits(z["brain"], count=int(np.prod(shape))).astype(bool).reshape(shape)).to(dev)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    n, bs = len(x_all), a.batch_size
    print(f"{a.out.name}: init {a.init} member {a.member} seed {a.seed} on {dev}, {n} slices, "
          f"batch {bs}, lr {a.lr}, weight {a.weight}, budget {a.budget:.0f}s", flush=True)
    t0, step, hist, half_saved = time.time(), 0, [], False

    def save(path: Path) -> None:
        sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save({"cfg": cfg.to_dict(), "state_dict": sd, "steps": step, "init": a.init,
                    "seed": a.seed, "member": a.member, "lr": a.lr, "weight": a.weight,
                    "batch_size": bs, "budget_s": a.budget, "torch": str(torch.__version__),
                    "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}, path)

    while True:
        el = time.time() - t0
        frac = el / a.budget
        if frac >= 1 or (a.max_steps and step >= a.max_steps):
            break
        if not half_saved and frac >= 0.5:
            save(a.out.with_suffix(".half"))
            half_saved = True
        lr = a.lr if frac < 1 - a.decay else a.lr * max(0.0, (1 - frac) / a.decay)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (bs,), generator=gen, device=dev)
        x, m = x_all[idx], m_all[idx]
        fl = torch.rand(bs, generator=gen, device=dev) < 0.5
        x = torch.where(fl[:, None, None], x.flip(-1), x)
        m = torch.where(fl[:, None, None], m.flip(-1), m)
        sp = spots_vectorised(m, gen)
        noisy = pretext.coarse_noise(x, gen, 16, 0.3, mask=m) + sp
        w = (1 + a.weight * (sp.abs() > pretext.SPOT_WEIGHT_THRESHOLD).float()).unsqueeze(1)
        loss = losses.rec_loss(net(noisy.unsqueeze(1)).recon, x.unsqueeze(1), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            hist.append(float(loss.detach()))
        if step % 2000 == 0:
            print(f"{a.out.name} step {step} {el:.0f}s lr {lr:.2e} loss {np.mean(hist[-20:]):.3f}", flush=True)
    save(a.out)
    print(f"{a.out.name}: saved after {step} steps, {time.time() - t0:.0f}s, "
          f"loss first {np.mean(hist[:5]) if hist else float('nan'):.3f} last {np.mean(hist[-5:]) if hist else float('nan'):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
