"""A flood of echoes from a modality's own host must not turn the modality away.

Ten parallel loops of back-to-back C-ECHO associations (an unlisted calling AE title, from
127.0.0.1) run while a listed modality on the same host sends a 40-slice series in eight
associations. The series must be accepted in full with no refused association; the flood's
refusals must all be A-ASSOCIATE-RJ (never a bare close) and counted per calling host in /metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Node
from tests.factories import make_series
from tests.reliability.conftest import Ledger, reconcile, record, size

pytestmark = [pytest.mark.reliability,
              pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

# One loop: associations back to back, each one C-ECHO, at least `per_loop` of them and until
# the stop file exists; prints its outcome counts.
ECHO_LOOP = """
import json, os, sys
from pynetdicom import AE
port, per_loop, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
counts = {"echoed": 0, "rejected": 0, "closed": 0}
ae = AE(ae_title="FLOOD")
ae.add_requested_context("1.2.840.10008.1.1")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
while sum(counts.values()) < per_loop or not os.path.exists(stop):
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if assoc.is_established:
        assoc.send_c_echo()
        assoc.release()
        counts["echoed"] += 1
    elif assoc.is_rejected:
        counts["rejected"] += 1
    else:  # aborted or closed without an A-ASSOCIATE-RJ
        counts["closed"] += 1
print(json.dumps(counts))
"""


def metric_samples(node: Node, name: str) -> list[tuple[dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        out.append((labels, float(m.group(2))))
    return out


def test_echo_flood_from_the_modality_host(node_factory: Any, tmp_path: Path) -> None:
    loops, per_loop = 10, size(12, 30)  # at least 120 echoes quick, 300 full
    node: Node = node_factory(security={"priority_ae_titles": ["MODALITY"]}).start()
    series = make_series(tmp_path / "ct", n=40, seed=26, size=64)
    chunks = [series[i:i + 5] for i in range(0, 40, 5)]  # eight associations, as storescu did

    stop = tmp_path / "stop"
    flood = [subprocess.Popen([sys.executable, "-c", ECHO_LOOP, str(node.port), str(per_loop),
                               str(stop)], stdout=subprocess.PIPE, text=True)
             for _ in range(loops)]
    ledger = Ledger()
    try:
        time.sleep(2.0)  # the loops are importing pynetdicom, then flooding
        t0 = time.perf_counter()
        for chunk in chunks:
            ledger.send(node.port, chunk, calling="MODALITY")
        series_s = time.perf_counter() - t0
        flooding = sum(p.poll() is None for p in flood)
    finally:
        stop.touch()
        outcomes = [json.loads(p.communicate(timeout=300)[0]) for p in flood]
    totals = {k: sum(o[k] for o in outcomes) for k in ("echoed", "rejected", "closed")}
    echoes = sum(totals.values())

    out = reconcile(node, ledger)
    record("flood", echoes, ledger, out, series_s,
           note=f"series {series_s:.1f} s; flood echoed {totals['echoed']}, "
                f"rejected {totals['rejected']}, closed {totals['closed']}")
    assert ledger.failures == 0, f"{ledger.failures} association(s) or stores of the series failed"
    assert len(ledger.acked) == 40
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
    assert totals["closed"] == 0, f"{totals['closed']} flood associations closed without a reason"
    assert flooding == loops, "the flood was over before the series was sent"
    refused = {labels["reason"]: v for labels, v in
               metric_samples(node, "triage_admission_refused_total")
               if labels.get("address") == "127.0.0.1"}
    assert sum(refused.values()) == totals["rejected"], refused

