"""The node's runtime needs only what scoring needs.

tqdm, nilearn and scikit-learn serve training and evaluation (``pip install triage-agent[train]``);
a node installed without that extra must still start and score. A fresh interpreter in which
those packages cannot be imported loads the node's modules and the bundled detector and runs
``triage-agent score``; no module of the project may even try to import them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.test_model_e2e import _write_phantom_series, tiny_ckpt  # noqa: F401  (fixture)

TRAIN_ONLY = ("tqdm", "nilearn", "sklearn")

SCRIPT = """
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
tried = []

class TrainingExtraAbsent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        tried.append([name, frame.f_code.co_filename if frame is not None else "?"])
        raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, TrainingExtraAbsent())
import triage_agent.app, triage_agent.inference, triage_agent.worker, triage_agent.commands.serve
from triage_model.checkpoint import load_detector
from triage_agent.cli import main

load_detector(None, device="cpu")  # the bundled weights
rc = main(["score", sys.argv[2], "--model", sys.argv[3], "--json", "--device", "cpu",
           "--config", sys.argv[4]])
# and the worker's scorer itself, whatever the command's series selection decided
from triage_agent.inference import find_series, score_series
(files,) = find_series([sys.argv[2]]).values()
verdict = score_series(files, load_detector(sys.argv[3], device="cpu")).verdict
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"rc": rc, "verdict": verdict, "tried": tried, "loaded": loaded}))
"""


def test_serve_and_score_run_without_the_training_extra(tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    _write_phantom_series(tmp_path / "in" / "a", n=24)  # the [series] rules want 20 or more
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(TRAIN_ONLY), str(tmp_path / "in"), str(tiny_ckpt),
         str(tmp_path / "absent.toml")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    *scores, report = proc.stdout.strip().splitlines()
    result = json.loads(report)
    assert result["rc"] == 0 and result["loaded"] == []
    assert len(scores) == 1 and json.loads(scores[0])["verdict"] != "not_assessable"
    assert result["verdict"] in ("normal", "abnormal")
    ours = [(name, f) for name, f in result["tried"]
            if Path(f).resolve().is_relative_to(REPO) and ".venv" not in Path(f).parts]
    assert ours == [], f"the runtime imports training-only packages: {ours}"
