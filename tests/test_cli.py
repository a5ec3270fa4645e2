"""The command line: quick help without the model stack, help text everywhere, --version, the text
`status` with its priority column, and a closed pipe that ends quietly."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.factories import CANARY_ID, CANARY_NAME
from triage_agent import db
from triage_agent.cli import build_parser, main
from triage_agent.models import Delivery, Job, Output, Result, Series, Study

HEAVY = ("torch", "highdicom", "triage_model.checkpoint", "pynetdicom", "sqlalchemy", "numpy")


def _imported_after(argv: list[str]) -> dict[str, object]:
    """Run ``main(argv)`` in a fresh interpreter; its exit code, stdout and the heavy modules
    that were imported."""
    code = (
        "import sys, json, contextlib, io\n"
        "from triage_agent.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        rc = main({argv!r})\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'out': out.getvalue(), 'heavy': heavy}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["status", "--help"],
                                  ["serve", "--help"], ["db", "upgrade", "--help"]])
def test_help_answers_without_importing_the_model_stack(argv: list[str]) -> None:
    got = _imported_after(argv)
    assert got["rc"] == 0 and "usage: triage-agent" in str(got["out"])
    assert "torch" not in got["heavy"] and "highdicom" not in got["heavy"], got["heavy"]
    if argv != ["--help"]:  # one command's help imports that command only
        assert got["heavy"] == [], got["heavy"]


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"triage-agent {version('triage-agent')}"


def _walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Every subcommand or option of ``parser`` (recursively) whose help text is missing."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not (described.get(name) or "").strip():
                    missing.append(f"{path} {name}: no description")
                missing += _walk(sub, f"{path} {name}")
        elif action.help != argparse.SUPPRESS and not (action.help or "").strip():
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")
    return missing


def test_every_subcommand_and_option_has_help_text() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "worker", "status", "check-config", "db", "train", "retry"} <= set(
        commands.choices)
    assert _walk(parser, "triage-agent") == []


# ----------------------------------------------------------------------------------- status


@pytest.fixture
def status_db(tmp_path: Path) -> Path:
    """A config and a database with an urgent abnormal series (one delivery dead), a normal
    one, a series still receiving and ``extra`` older skipped series; patients are canaries."""
    url = f"sqlite:///{tmp_path / 'triage.db'}"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n')
    db.upgrade(url)
    engine = db.make_engine(url)
    t0 = dt.datetime(2026, 3, 1, 8, 0, 0)
    with db.session_factory(engine)() as s, s.begin():
        study = Study(study_instance_uid="1.2.3", patient_name=CANARY_NAME, patient_id=CANARY_ID)
        s.add(study)
        for i in range(400):  # older series, enough text to fill a pipe
            s.add(Series(series_instance_uid=f"1.2.3.9.{i}", study=study, modality="CT",
                         state="skipped", reason="not axial", instance_count=3,
                         last_received_at=t0 - dt.timedelta(minutes=1 + i)))
        rows = [("1.2.3.1", "delivered", 23.41, "abnormal", "urgent"),
                ("1.2.3.2", "delivered", 0.91, "normal", "routine")]
        for n, (uid, state, score, verdict, prio) in enumerate(rows):
            se = Series(series_instance_uid=uid, study=study, modality="CT", state=state,
                        series_description="HEAD 5mm", instance_count=32,
                        last_received_at=t0 + dt.timedelta(minutes=n))
            job = Job(series=se, state="done")
            s.add_all([se, job])
            s.flush()
            res = Result(job_id=job.id, series_id=se.id, score=score, verdict=verdict,
                         threshold=3.0, model_name="m", model_version="1", weights_sha256="0",
                         priority=prio)
            s.add(res)
            s.flush()
            out = Output(result_id=res.id, kind="sr", sop_class_uid="1.2", path="x",
                         sop_instance_uid=f"{uid}.99", series_instance_uid=f"{uid}.98")
            s.add(out)
            s.flush()
            s.add(Delivery(output_id=out.id, destination="pacs", state="delivered"))
            if verdict == "abnormal":
                s.add(Delivery(output_id=out.id, destination="ris", state="dead",
                               last_error="association rejected"))
        s.add(Series(series_instance_uid="1.2.3.3", study=study, modality="CT",
                     state="receiving", instance_count=7,
                     last_received_at=t0 + dt.timedelta(minutes=5)))
    engine.dispose()
    return cfg


def test_status_text_shows_priority_and_no_patient_identifiers(
    status_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--config", str(status_db), "--limit", "4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    assert header[header.index("state") + 1] == "priority", lines[0]
    assert len(lines) == 2 + 4, out
    at, to = lines[0].index("state"), lines[0].index("detail")

    def state_priority(line: str) -> list[str]:
        return line[at:to].split()

    receiving, normal, abnormal = lines[2], lines[3], lines[4]
    assert state_priority(receiving) == ["receiving", "-"], receiving
    assert state_priority(normal) == ["delivered", "routine"], normal
    assert state_priority(abnormal) == ["delivered", "urgent"], abnormal
    assert "abnormal score 23.410 (threshold 3.000)" in abnormal
    assert "deliveries 1 dead, 1 delivered (dead #" in abnormal
    assert "to ris: association rejected" in abnormal
    assert "not axial" in lines[5]

    assert main(["status", "--config", str(status_db), "--json", "--limit", "3"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["state"] for r in recs] == ["receiving", "delivered", "delivered"]
    assert recs[2]["priority"] == "urgent" and recs[2]["verdict"] == "abnormal"
    assert {d["state"] for d in recs[2]["deliveries"]} == {"delivered", "dead"}
    assert "priority" not in recs[0]  # not scored yet: no result fields
    for text in (out, json.dumps(recs)):
        assert CANARY_NAME not in text and CANARY_ID not in text and "CANARY" not in text


def test_status_into_a_closed_pipe_ends_quietly(status_db: Path) -> None:
    # The reader is gone before the first write: every write fails, as at `| head -1`.
    p = subprocess.Popen([sys.executable, "-m", "triage_agent.cli", "status", "--config",
                          str(status_db), "--limit", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141  # 128 + SIGPIPE, like other Unix tools
    assert err == "", err

    r = subprocess.run(f"'{sys.executable}' -m triage_agent.cli status --config '{status_db}' "
                       "--limit 1000 | head -1", shell=True, capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.startswith("last received (UTC)") and r.stderr == "", r.stderr
