"""agent.toml: the shipped file is valid, and every mistake is reported with its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from triage_agent.cli import main
from triage_agent.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_agent_toml_is_valid_and_documented() -> None:
    cfg = load_config(REPO / "agent.toml")
    assert cfg.node.port == 11112 and cfg.database.url.startswith("sqlite:///")
    text = (REPO / "agent.toml").read_text()
    # Every setting in the file has a comment line above it (admins edit this file).
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            block = lines[max(0, i - 8):i]
            assert any(b.lstrip().startswith("#") for b in block), f"undocumented: {line}"


def test_demo_config_is_valid() -> None:
    cfg = load_config(REPO / "demo" / "agent.toml")
    assert [d.port for d in cfg.destinations] == [4242]
    assert cfg.storage.root == REPO / "var" / "demo" / "storage"


def test_check_config_lists_every_error_with_key(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "agent.toml"
    bad.write_text(
        '[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\nport = 70000\nbind_adress = "x"\n'
        '[security]\nallowed_networks = ["10.0.0.300/8"]\n'
        '[series]\nslice_thickness_mm = [5, 1]\n'
        '[triage]\nmode = "loud"\n'
        '[database]\nurl = "mysql://x"\n'
    )
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    for key in ("node.ae_title", "node.port", "node.bind_adress", "security.allowed_networks",
                "series", "triage.mode", "database.url"):
        assert key in err, key
    assert "7 problem(s)" in err
    assert "'active' or 'shadow'" in err


def test_check_config_ok_and_missing_and_broken_toml(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["check-config", str(REPO / "agent.toml")]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "b.toml"
    broken.write_text("[node\nport=1")
    assert main(["check-config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_check_config_counts_every_kind_of_destination(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs"\nport = 104\n'
        '[[dicomweb_destinations]]\nname = "vna"\nurl = "https://vna.example.org/dicom-web"\n'
        '[[hl7_destinations]]\nname = "ris"\nhost = "ris"\nport = 2575\n')
    assert main(["check-config", str(cfg)]) == 0
    assert "1 DICOM, 1 DICOMweb, 1 HL7 destination(s)" in capsys.readouterr().out
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert main(["check-config", str(empty)]) == 0
    assert "no destination(s)" in capsys.readouterr().out


def test_serve_refuses_invalid_config_with_same_message(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[node]\nport = -1\n")
    r = subprocess.run([sys.executable, "-m", "triage_agent.cli", "serve", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "node.port: Input should be greater than or equal to 0" in r.stderr
    assert not (tmp_path / "var").exists()  # nothing created on a refused start


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text('[storage]\nroot = "data/st"\n')
    cfg = load_config(tmp_path / "agent.toml")
    assert cfg.storage.root == tmp_path / "data/st"
    assert cfg.database.url == f"sqlite:///{tmp_path}/var/triage.db"


def test_priority_bands_follow_the_operating_threshold(tmp_path: Path) -> None:
    """Normal verdicts are routine; abnormal ones get the band their margin over the threshold
    in force reaches, so a recalibrated model or a site threshold keeps the bands meaningful."""
    import pytest

    from triage_agent.publish import priority_for

    cfg = load_config(REPO / "agent.toml")  # urgent at threshold + 4, high at the threshold
    assert priority_for(3.8, cfg, threshold=3.9) == "routine"
    assert priority_for(None, cfg, threshold=3.9) == "routine"
    assert priority_for(3.9, cfg, threshold=3.9) == "high"
    assert priority_for(7.8, cfg, threshold=3.9) == "high"
    assert priority_for(8.0, cfg, threshold=3.9) == "urgent"
    assert priority_for(5.5, cfg, threshold=1.0) == "urgent"  # a site's lower threshold
    toml = tmp_path / "a.toml"
    toml.write_text('[[triage.priority_bands]]\nname = "stroke"\nmin_score = 10.0\n'
                    '[[triage.priority_bands]]\nname = "high"\nabove_threshold = 0.0\n')
    site = load_config(toml)
    assert priority_for(12.0, site, threshold=3.9) == "stroke"
    assert priority_for(9.0, site, threshold=3.9) == "high"
    assert priority_for(12.0, site, threshold=20.0) == "routine"  # below threshold: normal
    toml.write_text('[[triage.priority_bands]]\nname = "x"\nmin_score = 1.0\n'
                    'above_threshold = 1.0\n')
    with pytest.raises(Exception, match="exactly one of min_score and above_threshold"):
        load_config(toml)
