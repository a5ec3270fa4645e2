"""The package installs anywhere: a wheel built from this tree, installed without extras into a
fresh virtual environment, creates the database from any folder (its migrations ship inside it),
loads the bundled model and scores a series, and brings none of the training-only dependencies.

This is what a site gets from ``pip install .`` or a built wheel, and what the Docker images do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN_ONLY = ("nilearn", "sklearn", "tqdm")


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)], cwd=out)
    (whl,) = out.glob("triage_agent-*.whl")
    return whl


def test_wheel_carries_migrations_weights_and_no_generic_model_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info",
                                                                            ".data"))}
    assert tops == {"triage_agent", "triage_model"}, tops
    assert "triage_agent/migrations/env.py" in names
    assert any(n.startswith("triage_agent/migrations/versions/0001") for n in names)
    assert "triage_model/weights/detector.pt" in names
    assert "triage_agent/py.typed" in names


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root / "v")
    pip = [str(root / "v" / "bin" / "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    # The CPU build of torch first, as the Makefile and the Dockerfiles do.
    torch_pin = f"torch=={__import__('torch').__version__.split('+')[0]}"
    run(pip + [torch_pin], cwd=root)
    run(pip + [str(wheel)], cwd=root)
    return root / "v"


def test_fresh_install_upgrades_db_and_scores_from_any_folder(fresh_venv: Path,
                                                              tmp_path: Path) -> None:
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import write_case_dicom

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = elsewhere / "site.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{elsewhere}/db/triage.db"\n'
                   f'[storage]\nroot = "{elsewhere}/storage"\n')
    exe = str(fresh_venv / "bin" / "triage-agent")
    run([exe, "db", "upgrade", "--config", str(cfg)], cwd=elsewhere)
    assert (elsewhere / "db" / "triage.db").stat().st_size > 0

    # No generic `model` package and no training-only dependency in the runtime install.
    py = str(fresh_venv / "bin" / "python")
    probe = run([py, "-c", "import importlib.util, json; print(json.dumps({m: "
                 "importlib.util.find_spec(m) is not None for m in "
                 f"{('model',) + TRAIN_ONLY!r}}}))"], cwd=elsewhere)
    assert json.loads(probe.stdout) == {m: False for m in ("model",) + TRAIN_ONLY}

    # The bundled model scores a real-looking series from the wheel.
    write_case_dicom(make_case(3, "normal", matrix=128), elsewhere / "series")
    p = run([exe, "score", str(elsewhere / "series"), "--json", "--config", str(cfg)],
            cwd=elsewhere)
    (line,) = p.stdout.strip().splitlines()
    res = json.loads(line)
    assert res["verdict"] in ("normal", "abnormal"), res
    assert res["score"] is not None and res["threshold"] > 0
