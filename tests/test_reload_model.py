"""SIGHUP loads a new model file (a site model written over the old one) without dropping
associations; a file that does not load leaves the model in use."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from pynetdicom import AE
from sqlalchemy import select
from triage_model.checkpoint import make_checkpoint, save_checkpoint, sha256_file
from triage_model.network import NetConfig, build_network
from triage_model.scoring import ScoringConfig

from tests.conftest import Node, wait_for
from tests.factories import CT
from tests.test_ops import canary_series
from triage_agent.models import Event, Result

S = 32


def _model(path: Path, threshold: float) -> Path:
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    save_checkpoint(make_checkpoint("dae", net=net, input_size=S,
                                    scoring=ScoringConfig(rec_q=0.05),
                                    thresholds={"max": threshold, "topk_mean": threshold}), path)
    return path


def _send(node: Node, assoc: Any, files: list[Path]) -> str:
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    return str(pydicom.dcmread(files[0]).SeriesInstanceUID)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sighup_loads_a_new_model_file_without_dropping_associations(
        node_factory: Any, tmp_path: Path) -> None:
    weights = _model(tmp_path / "site.pt", -1.0e9)  # everything abnormal
    first_sha = sha256_file(weights)
    node: Node = node_factory(worker={"count": 1, "poll_interval_s": 0.2},
                              model={"weights": str(weights), "device": "cpu"},
                              series={"quiet_period_s": 1.0, "sweep_interval_s": 0.3},
                              ).start(timeout_s=120)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
    assert assoc.is_established
    uid = _send(node, assoc, canary_series(tmp_path, 31, "a"))
    rec = node.wait_state(uid, {"scored", "delivered"}, 60)
    assert rec["verdict"] == "abnormal" and rec["threshold"] == -1.0e9

    # a site model written over the file in use (same path, same configuration), then SIGHUP
    _model(tmp_path / "new.pt", 1.0e9).replace(weights)
    second_sha = sha256_file(weights)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)

    def reloaded() -> Any:
        with node.session()() as s:
            return s.scalar(select(Event).where(Event.kind == "config_reloaded"))

    ev = wait_for(reloaded, 30, "config_reloaded event")
    assert f"weights {second_sha[:12]}" in ev.detail

    # the association opened before the reload still works; the next series uses the new model
    uid2 = _send(node, assoc, canary_series(tmp_path, 32, "b"))
    assoc.release()
    rec = node.wait_state(uid2, {"scored", "delivered"}, 60)
    assert rec["verdict"] == "normal" and rec["threshold"] == 1.0e9
    with node.session()() as s:
        shas = {r.weights_sha256 for r in s.scalars(select(Result))}
    assert shas == {first_sha, second_sha}

    # a broken file: refused, the model in use is kept
    weights.write_bytes(b"not a model")
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "the model in use is kept" in node.log_path.read_text(), 30,
             "refused model reload")
    assert node.proc.poll() is None
