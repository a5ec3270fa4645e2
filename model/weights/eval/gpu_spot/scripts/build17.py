# ruff: noqa -- research script of the thirteenth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""Build the bundled checkpoint after RULE17: the shipped file with its four members replaced by a
GPU candidate (B: gpu/B0-B3.pt; B2: gpu/B20-B23.pt), same scoring, calibrated by the product's
calibrate on the 32 validation series + dev6's 120 normals. python build17.py OUT.pt TAG"""
import sys, copy, time, os
from pathlib import Path
import torch
sys.path.insert(0, "/work/main")
from model.checkpoint import read_checkpoint, default_weights_path, make_checkpoint, save_checkpoint
from model.network import NetConfig, build_network
from model.scoring import ScoringConfig
from model.synth import make_dataset_plan
from model.train import calibrate, SliceSet
from triage_agent.commands.train import cases_to_slices
from triage_agent.inference import synthetic_cases, synthetic_case

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
out, tag = Path(sys.argv[1]), sys.argv[2]
cache = Path("/work/runs/cache")
ck, sha = read_checkpoint(default_weights_path())
state = dict(ck["state_dict"]); training = copy.deepcopy(ck["training"])
training["built_from"] = {"sha256": sha, "name": ck["name"]}
for k in range(4):
    st = torch.load(f"/work/runs/s13/gpu/{'B' if tag == 'B' else 'B2'}{k}.pt", weights_only=False)
    for key, v in st["state_dict"].items():
        assert f"members.{k}.{key}" in state
        state[f"members.{k}.{key}"] = v
    rec = {"script": "bench/gpu_spot.py (bench/gpu_spot.sh)", "steps": int(st["steps"]), "lr": st["lr"],
           "spot_weight": st["weight"], "batch_size": st["batch_size"], "budget_s": st["budget_s"],
           "device": st["device"] + ", 8 jobs side by side", "torch": st["torch"],
           "args": f"--member {k} --init bundled --seed {5342 + k} --budget 400"}
    if tag == "B2":
        b = torch.load(f"/work/runs/s13/gpu/B{k}.pt", weights_only=False)
        rec = {"stage1": dict(rec, steps=int(b["steps"])),
               "stage2": {"script": "bench/gpu_spot.py", "steps": int(st["steps"]), "lr": st["lr"],
                          "spot_weight": st["weight"], "batch_size": st["batch_size"], "budget_s": st["budget_s"],
                          "device": st["device"] + ", 4 jobs side by side", "torch": st["torch"],
                          "args": f"--member {k} --init-file B{k}.pt --seed {6342 + k} --lr 2e-4 --budget 230"}}
    training["members"][k]["gpu_spot_fine_tune"] = rec
net = build_network(NetConfig.from_dict(ck["net_config"])); net.load_state_dict(state)
scoring = ScoringConfig.from_dict(ck["scoring"])
name = "ssl-ood-dae-ensemble4-spot-gpu"
new = make_checkpoint("dae", net=net, scoring=scoring, training=training, name=name, hu=ck["hu"])
new["display_name"] = ck["display_name"]
_, va = cases_to_slices(synthetic_cases(160, 0, 1000, cache_dir=cache)).split(0.2, 1000)
assert va.n_series == 32 and len(va) == 1119, (va.n_series, len(va))
dev6n = [synthetic_case(s, lab, cache_dir=cache) for s, lab in make_dataset_plan(120, 132, 9000) if lab == "normal"]
assert len(dev6n) == 120
cal = SliceSet.concat([va, cases_to_slices(dev6n)])
t0 = time.time()
new = calibrate(new, cal)
new["training"]["val_series"], new["training"]["val_slices"] = va.n_series, len(va)
new["training"]["calibration_set"] = dict(ck["training"]["calibration_set"])
digest = save_checkpoint(new, out)
print(f"wrote {out} in {time.time()-t0:.0f}s: calibrated on {cal.n_series} series / {len(cal)} slices; thr(max) "
      f"{new['thresholds']['max']:.4f} topk {new['thresholds']['topk_mean']:.4f} pixel {new['pixel_threshold']:.4f} "
      f"norm r {new['norm']['r_mean']:.5f}/{new['norm']['r_std']:.5f} sha {digest[:12]}")
