"""Operations: /healthz, /readyz, /metrics, the status page (in Chromium), SIGHUP reload, and the
PHI canary sweep over every log line, metric, page and error column."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select
from triage_model.synth import make_case

from tests.conftest import Node, storescu, wait_for
from tests.factories import CANARY_ID, CANARY_NAME, CT
from tests.peers import StoreSCP, free_port
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from tests.test_node import _send_raw
from triage_agent.models import Delivery, Event, Job, Series
from triage_agent.synth_dicom import write_case_dicom

REPO = Path(__file__).resolve().parent.parent
CANARIES = (CANARY_NAME, CANARY_ID, "CANARY", "PHIPATIENT")


def http(node: Node, path: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}{path}", timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[int]:
    scp = StoreSCP(tmp_path / "pacs")
    yield scp.port
    scp.stop()


def canary_series(tmp_path: Path, seed: int, name: str = "head") -> list[Path]:
    return write_case_dicom(make_case(seed, "normal", matrix=128), tmp_path / name,
                            patient_name=CANARY_NAME, patient_id=CANARY_ID)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_observability_status_page_and_phi_canary(
    node_factory: Any, tiny_ckpt: Path, pacs: int, tmp_path: Path  # noqa: F811
) -> None:
    dead_port = free_port()  # a destination that is down: its errors must carry no PHI either
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        triage={"threshold": -1.0e9},  # everything abnormal, so heat maps are made
        delivery={"interval_s": 0.3, "backoff_base_s": 0.3, "backoff_cap_s": 1.0,
                  "timeout_s": 3.0, "max_attempts": 2},
    )
    node.add_destination("pacs", "PACS", "127.0.0.1", pacs)
    node.add_destination("down", "DOWN", "127.0.0.1", dead_port)
    node.start(timeout_s=120)
    files = canary_series(tmp_path, 21)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files[:1], called="WRONG").returncode != 0
    # A broken dataset with canary identifiers: its failure is audited without them.
    raw = files[0].read_bytes()
    assert _send_raw(node.port, raw[: len(raw) // 3], "canary") in (0xA900, 0xC210)

    rec = node.wait_state(uid, {"failed", "delivered"}, timeout_s=120)
    assert rec["verdict"] == "abnormal"
    states = {d["destination"]: d["state"] for d in rec["deliveries"]}
    assert set(states.values()) == {"delivered", "dead"} or states["pacs"] == "delivered"

    assert http(node, "/healthz")[0] == 200
    code, body, _ = http(node, "/readyz")
    assert code == 200 and json.loads(body)["checks"] == {
        "database": "ok", "storage": "ok", "model": "ok"}
    code, metrics, ctype = http(node, "/metrics")
    text = metrics.decode()
    assert code == 200 and ctype.startswith("text/plain")
    assert 'triage_associations_total{outcome="rejected",reason="called_ae"} 1.0' in text
    assert 'triage_instances_received_total{outcome="stored"}' in text
    assert "triage_model_info{" in text
    assert "triage_inference_seconds_count 1.0" in text
    assert 'triage_deliveries_total{outcome="delivered"}' in text
    assert 'triage_series{state=' in text and "triage_queue_depth" in text

    code, page, ctype = http(node, "/")
    html = page.decode()
    assert code == 200 and "text/html" in ctype
    assert "abnormal" in html and "hidden" in html and "/thumb/" in html
    thumb = html.split("/thumb/")[1].split("'")[0]
    code, png, ctype = http(node, f"/thumb/{thumb}")
    assert code == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    # A click on the row opens the series page: heat maps at full size, the delivery history.
    link = html.split("href='/series/")[1].split("'")[0]
    code, series_page, _ = http(node, f"/series/{link}")
    spage = series_page.decode()
    assert code == 200 and "Deliveries" in spage and "pacs" in spage and "down" in spage
    full = spage.split("src='/sc/")[1].split("'")[0]
    code, big, ctype = http(node, f"/sc/{full}")
    assert code == 200 and ctype == "image/png" and len(big) > len(png)
    assert http(node, "/series/999999")[0] == 404 and http(node, "/sc/999999.png")[0] == 404
    html += spage  # swept for canaries below

    # The PHI sweep: log, metrics, page and every error/detail column (audit events reach the
    # database through the audit writer: wait for the store failure's).
    def store_failed() -> Event | None:
        with node.session()() as s:
            return s.scalar(select(Event).where(Event.kind == "store_failed"))

    wait_for(store_failed, 10, "the store_failed audit event")
    swept = [node.log_path.read_text(), text, html]
    with node.session()() as s:
        swept += [e.detail or "" for e in s.scalars(select(Event))]
        swept += [j.last_error or "" for j in s.scalars(select(Job))]
        swept += [d.last_error or "" for d in s.scalars(select(Delivery))]
        swept += [x.reason or "" for x in s.scalars(select(Series))]
        assert s.scalar(select(Event).where(Event.kind == "store_failed")) is not None
    blob = "\n".join(swept)
    for canary in CANARIES:
        assert canary not in blob, f"{canary} leaked"

    # A real browser renders the page; keep a screenshot for the docs.
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium not found: apt-get install chromium"
    shot = tmp_path / "status_page.png"
    r = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}", "--hide-scrollbars",
         "--window-size=1400,520", f"--screenshot={shot}",
         f"http://127.0.0.1:{node.http_port}/"],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chrome2'}", "--dump-dom",
         f"http://127.0.0.1:{node.http_port}/"],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "abnormal" in dom and "<img" in dom
    if os.environ.get("TRIAGE_WRITE_DOCS"):
        shutil.copy(shot, REPO / "docs" / "status_page.png")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_can_show_patient_identifiers(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(http={"port": 0, "show_patient_identifiers": True}).start()
    files = canary_series(tmp_path, 22)
    assert storescu(node.port, files[:3]).returncode == 0
    html = http(node, "/")[1].decode()
    assert "CANARY^PHIPATIENT" in html and CANARY_ID in html


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sighup_reloads_thresholds_and_destinations_without_dropping_associations(
    node_factory: Any, tiny_ckpt: Path, pacs: int, tmp_path: Path  # noqa: F811
) -> None:
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        triage={"threshold": -1.0e9}, delivery={"interval_s": 0.3},
    ).start(timeout_s=120)
    first = canary_series(tmp_path, 23, "a")
    assert storescu(node.port, first).returncode == 0
    rec = node.wait_state(pydicom.dcmread(first[0]).SeriesInstanceUID, {"scored"}, 60)
    assert rec["verdict"] == "abnormal" and rec["deliveries"] == []

    # An association opened before the reload ...
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
    assert assoc.is_established

    node.sections["triage"]["threshold"] = 1.0e9
    node.add_destination("pacs", "PACS", "127.0.0.1", pacs)
    node.sections["node"]["max_associations"] = 3  # needs a restart: reported, not applied
    from tests.conftest import write_config

    write_config(node.config, node.sections, node.destinations)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)

    def reloaded() -> Any:
        with node.session()() as s:
            return s.scalar(select(Event).where(Event.kind == "config_reloaded"))

    ev = wait_for(reloaded, 20, "config_reloaded event")
    assert "triage" in ev.detail and "destinations" in ev.detail and "node" in ev.detail
    assert "needs restart: node" in ev.detail

    # ... still works after it, and the next series uses the new threshold and destination.
    second = canary_series(tmp_path, 24, "b")
    for f in second:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assoc.release()
    rec = node.wait_state(pydicom.dcmread(second[0]).SeriesInstanceUID, {"delivered"}, 60)
    assert rec["verdict"] == "normal" and rec["threshold"] == 1.0e9
    assert [d["destination"] for d in rec["deliveries"]] == ["pacs"]
    assert "reload: applied" in node.log_path.read_text()
