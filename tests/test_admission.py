"""Association admission (triage_agent/admission.py): listed modalities keep reserved slots, and a
refusal is an A-ASSOCIATE-RJ with a reason, counted per calling host."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.conftest import Node, require_tool, storescu
from tests.factories import make_series
from triage_agent.admission import Admission, HardenedServer
from triage_agent.config import AgentConfig, SecurityConfig
from triage_agent.models import Event


def fake_assoc(ip: str, server_class: Any = HardenedServer) -> Any:
    return SimpleNamespace(requestor=SimpleNamespace(address=ip), triage_server_class=server_class,
                           triage_closed=False)


def opened(adm: Admission, ip: str) -> Any:
    assert adm.connection_opened(ip) in ("ok", "identify")
    return fake_assoc(ip)


def test_unlisted_callers_cannot_take_the_reserved_slots() -> None:
    adm = Admission(max_associations=4, reserved_slots=2, max_per_address=5, pending_limit=8)
    flood = [opened(adm, "10.0.0.9") for _ in range(3)]
    assert adm.admit(flood[0], "10.0.0.9", listed=False, reserve=True) is None
    assert adm.admit(flood[1], "10.0.0.9", listed=False, reserve=True) is None
    refusal = adm.admit(flood[2], "10.0.0.9", listed=False, reserve=True)
    assert refusal is not None and refusal.reason == "unlisted_limit"
    assert refusal.reject == (2, 3, 2)  # rejected-transient, presentation, local-limit-exceeded
    ct = [opened(adm, "10.0.0.9") for _ in range(3)]
    assert adm.admit(ct[0], "10.0.0.9", listed=True, reserve=True) is None
    assert adm.admit(ct[1], "10.0.0.9", listed=True, reserve=True) is None
    full = adm.admit(ct[2], "10.0.0.9", listed=True, reserve=True)
    assert full is not None and full.reason == "association_limit"
    assert adm.in_use() == {"pending": 2, "general": 2, "priority": 2}
    for a in (*flood, *ct):
        adm.release(a)
        adm.release(a)  # once only
    assert adm.in_use() == {"pending": 0, "general": 0, "priority": 0}


def test_nothing_is_held_back_while_nobody_is_listed_and_the_per_address_cap_holds() -> None:
    adm = Admission(max_associations=4, reserved_slots=2, max_per_address=3, pending_limit=8)
    same_host = [opened(adm, "10.0.0.9") for _ in range(4)]
    assert [adm.admit(a, "10.0.0.9", listed=False, reserve=False) is None
            for a in same_host[:3]] == [True, True, True]  # above max - reserved: nobody listed
    cap = adm.admit(same_host[3], "10.0.0.9", listed=False, reserve=False)
    assert cap is not None and cap.reason == "per_address_limit"
    other = opened(adm, "10.0.0.10")
    assert adm.admit(other, "10.0.0.10", listed=False, reserve=False) is None


def test_connection_counts_belong_to_one_receiver() -> None:
    """Counts and callbacks belong to one receiver's server class: a second receiver in the
    same process neither inherits its counts nor its limits."""
    refused: list[tuple[str, str]] = []

    def server(pending_limit: int) -> Any:
        cls = HardenedServer.configured(
            admission=Admission(max_associations=4, reserved_slots=0, max_per_address=1,
                                pending_limit=pending_limit),
            on_refused=lambda ip, reason, why: refused.append((ip, reason)),
            on_tls_failed=None, tls_handshake_timeout_s=1.0)
        return object.__new__(cls)  # the counting needs no socket

    sa, sb = server(1), server(2)
    assert sa.verify_request(object(), ("10.0.0.1", 1000))
    assert not sa.verify_request(object(), ("10.0.0.1", 1001))  # a is saturated
    assert sb.verify_request(object(), ("10.0.0.1", 1002))  # b counts on its own
    second = object()
    assert sb.verify_request(second, ("10.0.0.1", 1003))
    assert id(second) in sb.must_identify  # over b's per-address cap: must show its request
    assert refused == [("10.0.0.1", "listener_saturated")]
    sa.admission.pending_closed("10.0.0.1")
    assert sa.verify_request(object(), ("10.0.0.1", 1004))  # the slot came back to a only
    assert not sb.verify_request(object(), ("10.0.0.1", 1005))
    assert HardenedServer.admission.in_use() == {"pending": 0, "general": 0, "priority": 0}


def test_listed_means_ae_title_and_network_when_both_are_given() -> None:
    sec = SecurityConfig(priority_ae_titles=["CT1"], priority_networks=["10.1.0.0/16"])
    assert sec.priority_listed("CT1", "10.1.2.3")
    assert not sec.priority_listed("CT1", "10.2.2.3")
    assert not sec.priority_listed("FLOOD", "10.1.2.3")
    assert SecurityConfig(priority_ae_titles=["CT1"]).priority_listed("CT1 ", "192.0.2.1")
    assert SecurityConfig(priority_networks=["10.1.0.0/16"]).priority_listed("ANY", "10.1.0.7")
    assert not SecurityConfig().priority_listed("CT1", "10.1.2.3")
    with pytest.raises(ValueError, match="reserved_slots .4. must be below node.max_associations"):
        AgentConfig.model_validate({"node": {"max_associations": 4},
                                    "security": {"priority_ae_titles": ["CT1"]}})
    AgentConfig.model_validate({"node": {"max_associations": 4}})  # nobody listed: no reserve


def _refused_metric(node: Node) -> dict[str, float]:
    """triage_admission_refused_total for 127.0.0.1, by reason."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^triage_admission_refused_total\{address="127\.0\.0\.1",reason="(\w+)"\} (\S+)$',
        text, re.M)}


SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@SQLITE
def test_listed_modality_is_admitted_when_unlisted_callers_hold_every_slot_they_may(
        node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(node={"max_associations": 3, "reserved_slots": 1},
                              security={"priority_ae_titles": ["MODALITY"]}).start()
    echoscu = require_tool("echoscu", "dcmtk")
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", node.port, ae_title="TRIAGE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        r = subprocess.run([echoscu, "-aet", "FLOOD", "-aec", "TRIAGE", "127.0.0.1",
                            str(node.port)], capture_output=True, text=True, timeout=60)
        out = (r.stdout + r.stderr).lower()
        assert r.returncode != 0 and "association rejected" in out, out
        assert "rejected transient" in out and "local limit exceeded" in out, out
        files = make_series(tmp_path / "ct", n=3, seed=7, size=64)
        assert storescu(node.port, files).returncode == 0  # calling AE MODALITY: listed
    finally:
        for a in held:
            a.release()
    assert _refused_metric(node) == {"unlisted_limit": 1.0}
    with node.session()() as s:
        details = s.scalars(select(Event.detail).where(Event.kind == "association_rejected")).all()
    deadline = time.monotonic() + 10
    while not details and time.monotonic() < deadline:  # the audit writer may lag
        time.sleep(0.2)
        with node.session()() as s:
            details = s.scalars(select(Event.detail)
                                .where(Event.kind == "association_rejected")).all()
    assert len(details) == 1 and "unlisted callers" in details[0]


@SQLITE
def test_silent_connections_over_the_per_address_cap_do_not_shut_out_a_modality(
        node_factory: Any, tmp_path: Path) -> None:
    """Connections that never send a request fill the per-address cap of 127.0.0.1; the
    modality on that host still gets in (it sends its request at once), and one more silent
    connection is closed within a second."""
    node: Node = node_factory(node={"max_connections_per_address": 3}).start()
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", node.port))
        extra.settimeout(3)
        t0 = time.monotonic()
        assert extra.recv(1) == b""  # closed by the node
        assert time.monotonic() - t0 < 1.5
        files = make_series(tmp_path / "ct", n=2, seed=8, size=64)
        r = storescu(node.port, files)
        assert r.returncode == 0, r.stderr
    finally:
        for s in silent:
            s.close()
    assert _refused_metric(node).get("per_address_limit") == 1.0
    assert "no association request within" in node.log_path.read_text()
