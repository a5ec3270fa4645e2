# ruff: noqa -- research script of the eleventh session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""Build the calibrated spot-fine-tuned ensemble checkpoint from the shipped one.
python build_new.py OUT.pt REC_Q MEMBER0.pt|- MEMBER1.pt|- ...  ('-' keeps the shipped member)"""
import sys, copy, dataclasses, hashlib, io
from pathlib import Path
import torch
sys.path.insert(0, "/work/main")
from model.checkpoint import read_checkpoint, default_weights_path, make_checkpoint, save_checkpoint
from model.network import NetConfig, build_network
from model.scoring import ScoringConfig
from model.train import calibrate
from triage_agent.commands.train import cases_to_slices
from triage_agent.inference import synthetic_cases

torch.set_num_threads(2)
out, rec_q, paths = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ck, sha = read_checkpoint(default_weights_path())
state = dict(ck["state_dict"])
training = copy.deepcopy(ck["training"])
training["built_from"] = {"sha256": sha, "name": ck["name"]}
for k, p in enumerate(paths):
    if p == "-":
        continue
    st = torch.load(p, weights_only=False)
    for key, v in st["state_dict"].items():
        assert f"members.{k}.{key}" in state
        state[f"members.{k}.{key}"] = v
    buf = io.BytesIO(); torch.save(st["state_dict"], buf)
    training["members"][k]["spot_fine_tune"] = {
        "script": "bench/spot_pilot.py", "steps": int(st["steps"]), "lr": 5e-4, "spot_weight": 20,
        "batch_size": 32, "device": "cpu (2 vCPU)", "torch": str(torch.__version__),
        "from_sha256": training["members"][k]["sha256"],
        "args": {0: "--member 0 --budget 1800 (1 432 steps, seed 4242)"}.get(k, f"--member {k} --steps 1000 --seed {4242 + k}"),
    }
net = build_network(NetConfig.from_dict(ck["net_config"]))
net.load_state_dict(state)
scoring = dataclasses.replace(ScoringConfig.from_dict(ck["scoring"]), rec_q=rec_q)
new = make_checkpoint("dae", net=net, scoring=scoring, training=training, name=ck["name"] + ("-spot" if any(p != "-" for p in paths) else ""), hu=ck["hu"])
new["display_name"] = ck["display_name"] + (", spot-fine-tuned" if any(p != "-" for p in paths) else "")
_, va = cases_to_slices(synthetic_cases(160, 0, 1000, cache_dir=Path("/work/runs/cache"))).split(0.2, 1000)
assert va.n_series == 32 and len(va) == 1119, (va.n_series, len(va))
new = calibrate(new, va)
new["training"]["val_series"], new["training"]["val_slices"] = va.n_series, len(va)
digest = save_checkpoint(new, out)
print(f"wrote {out}: thr(max) {new['thresholds']['max']:.4f} topk {new['thresholds']['topk_mean']:.4f} "
      f"pixel {new['pixel_threshold']:.4f} norm r {new['norm']['r_mean']:.5f}/{new['norm']['r_std']:.5f} sha {digest[:12]}")
