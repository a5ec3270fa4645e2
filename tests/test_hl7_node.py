"""The node sends an ORU^R01 per result to a RIS over MLLP (hl7apy's listener as the RIS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from triage_model.synth import make_case

from tests.conftest import Node, storescu
from tests.test_hl7 import Listener, listener, observations, parse  # noqa: F401  (fixture)
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.synth_dicom import write_case_dicom


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_result_reaches_the_ris_once(
    node_factory: Any, tiny_ckpt: Path, listener: Listener, tmp_path: Path  # noqa: F811
) -> None:
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        delivery={"interval_s": 0.3},
    )
    node.add_hl7_destination("ris", "127.0.0.1", listener.port)
    node.start(timeout_s=120)
    files = write_case_dicom(make_case(41, "normal", matrix=128), tmp_path / "s")
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert storescu(node.port, files).returncode == 0
    rec = node.wait_state(uid, {"delivered", "failed"}, timeout_s=90)
    assert rec["state"] == "delivered", rec
    assert [(d["object"], d["destination"]) for d in rec["deliveries"]] == [("hl7", "hl7:ris")]
    assert len(listener.received) == 1
    obx = observations(parse(listener.received[0]))
    assert obx["112002"].obx_5.to_er7() == uid
    code = {"abnormal": "263654008", "normal": "17621005", "not_assessable": "82334004"}
    assert obx["365853002"].obx_5.to_er7().startswith(code[rec["verdict"]] + "^")
