"""Research pilot (tenth session, not product code): fine-tune one member of the bundled
ensemble so that it also repairs small spots, the scale of the subtle lesions it misses.

    python bench/spot_pilot.py OUT.pt --member 0 --budget 1800 --lr 5e-4 --weight 20
    python bench/spot_pilot.py OUT.pt --member 1 --steps 1000 --seed 4243      # (eleventh session)

Corruption per training slice: the shipped coarse noise (std 0.3 on a 16 x 16 grid) plus 2-6
Gaussian spots inside the brain (sigma 0.7-2.0 px, 8-30 HU, 70 % hyperdense). The squared
error is weighted 1 + WEIGHT inside the spots (where the spot field exceeds 0.8 HU), because
unweighted the spots are about 5 % of the loss and the network does not learn them
(``--weight 0``, half of the slices spotted: the RULE13 run in the model card). The learning
rate is constant, then falls linearly to 0 over the last 30 % of the time budget (of the steps
with ``--steps``). The spots are ``triage_model.pretext.small_spots``, the same corruption that
``python -m triage_model.train --slices ... --init CKPT --spot-weight 20`` trains with.

Training data: the 128 training normals of ``make_dataset_plan(160, 0, seed=1000)`` (the 32
held-out validation series removed, split seed 1000, as for the bundled members), generated on
the fly and cached under ``--cache``. OUT holds ``cfg`` (NetConfig), ``state_dict`` and
``steps``; it is a bare member, not a calibrated checkpoint. Model card, "Tenth session".
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


def training_normals(cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled members' 128 training series: the 160 normals of seed 1000 minus the fifth
    held out for calibration, split as ``python -m triage_model.train --slices ... --seed 1000`` did."""
    from triage_agent.commands.train import cases_to_slices
    from triage_agent.inference import synthetic_cases

    train, _ = cases_to_slices(synthetic_cases(160, 0, 1000, cache_dir=cache)).split(0.2, 1000)
    return torch.from_numpy(train.x), torch.from_numpy(train.brain)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--member", type=int, default=0, help="ensemble member to start from")
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds of training")
    ap.add_argument("--steps", type=int, default=0,
                    help="train this many steps instead of a time budget (the schedule then "
                         "follows the step count, so a busy CPU does not shorten training)")
    ap.add_argument("--seed", type=int, default=4242, help="seed of batches, flips and spots")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight", type=float, default=20.0, help="extra loss weight in the spots")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/triage-synth-cache"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(77)
    gen = torch.Generator().manual_seed(a.seed)
    ck, _ = read_checkpoint(default_weights_path())
    ens_cfg = NetConfig.from_dict(ck["net_config"])
    ensemble = build_network(ens_cfg)
    ensemble.load_state_dict(ck["state_dict"])
    cfg, net = ens_cfg.member_configs()[a.member], ensemble.members[a.member]
    x_all, m_all = training_normals(a.cache)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    t0, step, hist = time.time(), 0, []
    net.train()
    while True:
        el = time.time() - t0
        frac = step / a.steps if a.steps else el / a.budget
        if frac >= 1:
            break
        lr = a.lr if frac < 0.7 else a.lr * max(0.0, (1 - frac) / 0.3)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(x_all), (32,), generator=gen)
        x, m = x_all[idx], m_all[idx]
        fl = torch.rand(32, generator=gen) < 0.5
        x = torch.where(fl[:, None, None], x.flip(-1), x)
        m = torch.where(fl[:, None, None], m.flip(-1), m)
        sp = pretext.small_spots(m, gen)
        noisy = pretext.coarse_noise(x, gen, 16, 0.3, mask=m) + sp
        w = (1 + a.weight * (sp.abs() > pretext.SPOT_WEIGHT_THRESHOLD).float()).unsqueeze(1)
        loss = losses.rec_loss(net(noisy.unsqueeze(1)).recon, x.unsqueeze(1), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt.step()
        step += 1
        hist.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"step {step} {el:.0f}s lr {lr:.2e} loss {np.mean(hist[-50:]):.3f}", flush=True)
    torch.save({"cfg": cfg.to_dict(), "state_dict": net.state_dict(), "steps": step}, a.out)
    print(f"saved {a.out} after {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
