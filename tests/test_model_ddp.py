"""DDP smoke test: two CPU processes (gloo) under torchrun train a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(180)
def test_torchrun_two_cpu_processes(tmp_path: Path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "triage_model.train", str(out), "--random", "32", "--size", "32", "--steps", "3",
           "--pretrain-steps", "1", "--batch-size", "2"]
    # one retry: on a shared machine the rendezvous port can be taken between probe and bind
    for _attempt in range(2):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=80,
                           cwd=Path(__file__).resolve().parents[1])
        if p.returncode == 0:
            break
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "rank0 done: world=2 steps=4" in p.stdout
    assert out.exists()
