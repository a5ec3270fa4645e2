# ruff: noqa -- research script of the twelfth session, kept as run for provenance (paths are that machine's)
# mypy: ignore-errors
"""Build the bundled checkpoint after RULE16: the shipped file (or its members replaced by C0-C3 with
--members), scoring slice_context W, calibrated by the product's calibrate on the 32 validation series
+ dev6's 120 normals. python build16.py OUT.pt W [--members]"""
import sys, copy, dataclasses, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "/work/main")
from model.checkpoint import read_checkpoint, default_weights_path, make_checkpoint, save_checkpoint
from model.network import NetConfig, build_network
from model.scoring import ScoringConfig
from model.synth import make_dataset_plan
from model.train import calibrate, SliceSet
from triage_agent.commands.train import cases_to_slices
from triage_agent.inference import synthetic_cases, synthetic_case

import os; torch.set_num_threads(int(os.environ.get("THREADS", "2")))
out, w = Path(sys.argv[1]), float(sys.argv[2])
cache = Path("/work/runs/cache")
ck, sha = read_checkpoint(default_weights_path())
state = dict(ck["state_dict"]); training = copy.deepcopy(ck["training"])
training["built_from"] = {"sha256": sha, "name": ck["name"]}
name = ck["name"]
if "--members" in sys.argv:
    for k in range(4):
        st = torch.load(f"/work/runs/s12/C{k}.pt", weights_only=False)
        for key, v in st["state_dict"].items():
            assert f"members.{k}.{key}" in state
            state[f"members.{k}.{key}"] = v
        training["members"][k]["spot_fine_tune_2"] = {
            "script": "bench/spot_pilot.py", "steps": int(st["steps"]), "lr": 5e-4, "spot_weight": 20,
            "batch_size": 32, "device": "cpu (2 vCPU)", "torch": str(torch.__version__),
            "args": f"--member {k} --steps 500 --seed {5242 + k}"}
    name += "2"
net = build_network(NetConfig.from_dict(ck["net_config"])); net.load_state_dict(state)
scoring = dataclasses.replace(ScoringConfig.from_dict(ck["scoring"]), slice_context=w)
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
new["training"]["calibration_set"] = {
    "series": int(cal.n_series), "slices": int(len(cal)),
    "what": "the 32 held-out validation series of make_dataset_plan(160, 0, 1000) (split seed 1000) "
            "+ the 120 normals of make_dataset_plan(120, 132, 9000) (dev6), twelfth session"}
digest = save_checkpoint(new, out)
print(f"wrote {out} in {time.time()-t0:.0f}s: calibrated on {cal.n_series} series / {len(cal)} slices; thr(max) "
      f"{new['thresholds']['max']:.4f} topk {new['thresholds']['topk_mean']:.4f} pixel {new['pixel_threshold']:.4f} "
      f"norm r {new['norm']['r_mean']:.5f}/{new['norm']['r_std']:.5f} sha {digest[:12]}")
