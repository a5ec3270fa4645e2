"""A small read-only HTTP server inside ``serve``: health, readiness, metrics, status page.

Loopback by default. The status page hides patient identifiers unless an admin enables
``[http] show_patient_identifiers``; nothing here can change state.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select

from triage_agent import db
from triage_agent.models import Output, Result
from triage_agent.operating_point import OperatingPoint
from triage_agent.status_view import SeriesStatus, queue_depth, recent_series, refusals_since

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        cfg = app.cfg.http
        handler = type("Handler", (_Handler,), {"app": app})
        self.httpd = ThreadingHTTPServer((cfg.bind_address, cfg.port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()
        log.info("HTTP status on http://%s:%d/", self.app.cfg.http.bind_address, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def readiness(app: Any) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    try:
        db.check_connection(app.engine)
        checks["database"] = "ok"
    except db.DatabaseError as e:
        checks["database"] = str(e)
    try:
        app.storage.check_space()
        checks["storage"] = "ok"
    except OSError as e:
        checks["storage"] = str(e)
    wanted = app.workers or app.cfg.worker.count
    checks["model"] = "ok" if (app.model is not None or not wanted) else "not loaded"
    return all(v == "ok" for v in checks.values()), checks


class _Handler(BaseHTTPRequestHandler):
    app: Any
    server_version = "triage-agent"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                self._send(200, b'{"status": "ok"}\n', "application/json")
            elif path == "/readyz":
                ok, checks = readiness(self.app)
                body = json.dumps({"ready": ok, "checks": checks}).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")
            elif path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path in ("/", "/index.html"):
                self._send(200, render_page(self.app).encode(), "text/html; charset=utf-8")
            elif path.startswith("/series/") and path[len("/series/"):].isdigit():
                page = render_series_page(self.app, int(path[len("/series/"):]))
                if page is None:
                    self._send(404, b"not found\n", "text/plain")
                else:
                    self._send(200, page.encode(), "text/html; charset=utf-8")
            elif path.startswith("/sc/") and path.endswith(".png"):
                png = heat_map_image(self.app, path[len("/sc/"):-len(".png")])
                if png is None:
                    self._send(404, b"not found\n", "text/plain")
                else:
                    self._send(200, png, "image/png")
            elif path.startswith("/thumb/") and path.endswith(".png"):
                png = thumbnail(self.app, path[len("/thumb/"):-len(".png")])
                if png is None:
                    self._send(404, b"not found\n", "text/plain")
                else:
                    self._send(200, png, "image/png")
            else:
                self._send(404, b"not found\n", "text/plain")
        except Exception:
            log.exception("http handler failed for %s", path)
            self._send(500, b"internal error\n", "text/plain")


def _png(app: Any, rel: str, max_size: int | None = None) -> bytes:
    """A stored secondary capture as PNG, shrunk to ``max_size`` pixels when given."""
    import pydicom
    from PIL import Image

    img = Image.fromarray(pydicom.dcmread(app.storage.abspath(rel)).pixel_array)
    if max_size is not None:
        img.thumbnail((max_size, max_size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def heat_map_image(app: Any, key: str) -> bytes | None:
    """One heat-map secondary capture at full size, by output id."""
    if not key.isdigit():
        return None
    with app.sessions() as s:
        rel = s.scalar(select(Output.path).where(Output.id == int(key), Output.kind == "sc"))
    return None if rel is None else _png(app, rel)


def thumbnail(app: Any, key: str) -> bytes | None:
    """A small PNG of the first heat-map image of a series' latest result."""
    if not key.isdigit():
        return None
    with app.sessions() as s:
        rel = s.scalar(
            select(Output.path).join(Result, Result.id == Output.result_id)
            .where(Result.series_id == int(key), Output.kind == "sc")
            .order_by(Result.id.desc(), Output.id).limit(1)
        )
    return None if rel is None else _png(app, rel, 160)


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} .sub{color:#555;margin-bottom:1em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:.35em .6em;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:middle}
th{background:#f0f0f0;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.abnormal{color:#b00020;font-weight:700} .normal{color:#1b5e20} .not_assessable{color:#8a6d00}
.pill{display:inline-block;padding:.05em .5em;border-radius:1em;background:#eee;font-size:.85em}
.urgent{background:#b00020;color:#fff} .high{background:#e65100;color:#fff}
img{height:64px;border-radius:3px} .uid{font-family:monospace;color:#555}
img.full{height:auto;max-width:100%;display:block;margin:0 0 1em}
h2{font-size:1.1em;margin:1.2em 0 .4em}
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:.4em .8em;margin-bottom:1em}
.drift{background:#fde2e1;border-color:#b00020}
"""


def drift_banner(app: Any) -> str:
    """The drift alarm's banner (triage_agent/drift.py) while it is on, else nothing."""
    st = getattr(app, "drift", None) and app.drift.status
    if not st or not st.alarm:
        return ""
    return (f"<div class='banner drift' id='drift-alarm'><strong>Drift alarm:</strong> "
            f"{html.escape(st.advice())}.<br><small>{html.escape(st.summary())}</small></div>")


def delivery_banner(app: Any) -> str:
    """Destinations whose delivery circuit is open or half-open (triage_agent/delivery.py)."""
    lanes = getattr(app, "lanes", None)
    paused = [c for c in (lanes.circuits() if lanes is not None else []) if c.state != "closed"]
    if not paused:
        return ""
    items = "".join(f"<li>{html.escape(c.describe())}</li>" for c in paused)
    return (f"<div class='banner drift' id='delivery-paused'><strong>Delivery paused:</strong>"
            f"<ul>{items}</ul></div>")


def open_node_warning(cfg: Any, port: int | None = None) -> str:
    return (f"This node stores from any caller that reaches {cfg.node.bind_address} port "
            f"{port or cfg.node.port}: no [security] allowed_calling_ae_titles, allowed_networks "
            "or client certificates are set.")


def threshold_text(app: Any) -> str:
    if app.model is None:
        return "threshold n/a"
    op = app.model.operating_point(app.cfg)
    origin = "model file" if op.source == "model" else "configuration"
    return f"threshold {op.threshold:.3f} (from the {origin})"


def admin_banners(app: Any) -> str:
    """What the admin must see: an open node, and today's refused associations and proposals."""
    e = html.escape
    out = []
    if app.run_receiver and app.cfg.security.open_to_anyone:
        warning = open_node_warning(app.cfg, app.receiver.port if app.receiver else None)
        out.append(f"<div class='banner' id='open-node'>{e(warning)}</div>")
    midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time())
    refused = refusals_since(app.sessions, midnight)
    if refused:
        items = "".join(f"<li>{e(r.describe())}</li>" for r in refused)
        out.append(f"<div class='banner' id='refused'><strong>Refused today (UTC):</strong>"
                   f"<ul>{items}</ul></div>")
    return "".join(out)


def by_priority(rows: list[SeriesStatus], app: Any) -> list[SeriesStatus]:
    """The reading room's order: the most urgent priority band first, then routine, then series
    not scored yet; newest first within each."""
    op = (app.model.operating_point(app.cfg) if app.model else
          OperatingPoint(app.cfg.triage.threshold or 0.0, tuple(app.cfg.triage.priority_bands)))
    bands = op.ranked_bands()
    rank = {b.name: i for i, b in enumerate(bands)}
    rank.setdefault("routine", len(bands))

    def key(r: SeriesStatus) -> tuple[int, float]:
        prio = rank.get(r.priority or "", len(bands) + 1) if r.has_result else len(bands) + 2
        return prio, -r.last_received_at.timestamp()

    return sorted(rows, key=key)


def render_series_page(app: Any, series_id: int) -> str | None:
    """One series: its result, every heat map at full size, and its delivery history."""
    show_phi = app.cfg.http.show_patient_identifiers
    rows = recent_series(app.sessions, 1, with_patient=show_phi, series_id=series_id)
    if not rows:
        return None
    (r,) = rows
    e = html.escape
    with app.sessions() as s:
        latest = s.scalar(select(Result.id).where(Result.series_id == series_id)
                          .order_by(Result.id.desc()).limit(1))
        images = list(s.scalars(select(Output.id).where(Output.result_id == latest,
                                                        Output.kind == "sc")
                                .order_by(Output.id))) if latest is not None else []
    score = "" if r.score is None else f"{r.score:.3f}"
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>triage-agent series</title><style>{STYLE}</style></head><body>",
        "<p><a href='/'>&larr; all series</a></p>",
        f"<h1>{e(r.series_description or 'series')}</h1>",
        f"<div class='sub'><span class='uid'>{e(r.series_instance_uid)}</span>; "
        f"{r.instances} slices; {e(r.state)}"
        + (f" ({e(r.reason)})" if r.reason else "") + "</div>",
        "<div class='banner'>AI triage &mdash; not for diagnosis.</div>",
    ]
    if show_phi:
        out.append(f"<p>patient {e(r.patient_name or '')} "
                   f"<span class='uid'>{e(r.patient_id or '')}</span></p>")
    if r.has_result:
        out.append(f"<p class='{e(r.verdict or '')}'>{e((r.verdict or '').replace('_', ' '))} "
                   f"&mdash; score {score}, threshold {r.threshold:.3f}, priority "
                   f"{e(r.priority or '')}</p>")
    out += [f"<img class='full' alt='heat map' src='/sc/{i}.png'>" for i in images]
    out.append("<h2>Deliveries</h2><table><thead><tr><th>object</th><th>destination</th>"
               "<th>state</th><th>attempts</th><th>last status</th><th>last error</th></tr>"
               "</thead><tbody>")
    for d in r.deliveries:
        status = "" if d.last_status is None else f"0x{d.last_status:04X}"
        out.append(f"<tr><td>{e(d.object)}</td><td>{e(d.destination)}</td><td>{e(d.state)}</td>"
                   f"<td class='num'>{d.attempts}</td><td>{status}</td>"
                   f"<td>{e(d.error or '')}</td></tr>")
    if not r.deliveries:
        out.append("<tr><td colspan='6'>nothing sent</td></tr>")
    out.append("</tbody></table></body></html>")
    return "".join(out)


def render_page(app: Any) -> str:
    cfg = app.cfg
    show_phi = cfg.http.show_patient_identifiers
    rows = by_priority(recent_series(app.sessions, cfg.http.page_size, with_patient=show_phi),
                       app)
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='10'><title>triage-agent status</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>triage-agent &mdash; {e(cfg.node.ae_title)}</h1>",
        f"<div class='sub'>mode {e(cfg.triage.mode)}; model "
        f"{e(app.model.name + ' ' + app.model.version) if app.model else 'not loaded'}; "
        f"{threshold_text(app)}; queue {queue_depth(app.sessions)}; "
        f"{e(cfg.destinations_summary())}; refreshes every 10 s</div>",
        "<div class='banner'>AI triage &mdash; not for diagnosis. "
        "Scores rank studies for reading order only.</div>",
        drift_banner(app),
        delivery_banner(app),
        admin_banners(app),
        "<table><thead><tr><th>last received (UTC)</th><th>patient</th><th>series</th>"
        "<th>slices</th><th>state</th><th>verdict</th><th>score</th><th>priority</th>"
        "<th>delivery</th><th>heat map</th></tr></thead><tbody>",
    ]
    for r in rows:
        patient = (f"{e(r.patient_name or '')}<br><span class='uid'>{e(r.patient_id or '')}</span>"
                   if show_phi else "hidden")
        verdict = r.verdict or ""
        score = "" if r.score is None else f"{r.score:.3f}"
        prio = r.priority or ""
        delivery = e(r.delivery_summary()) or "&ndash;"
        thumb = ""
        if verdict in ("abnormal", "normal"):
            thumb = (f"<a href='/series/{r.series_id}'><img alt='heat map' "
                     f"src='/thumb/{r.series_id}.png'></a>")
        pill = f"<span class='pill {e(prio)}'>{e(prio)}</span>" if prio else ""
        reason = f"<br><small>{e(r.reason)}</small>" if r.reason else ""
        out.append(
            f"<tr><td>{e(r.last_received_at.isoformat(timespec='seconds'))}</td><td>{patient}</td>"
            f"<td><a href='/series/{r.series_id}'>{e(r.series_description or 'series')}</a><br>"
            f"<span class='uid'>&hellip;{e(r.series_instance_uid[-12:])}</span></td>"
            f"<td class='num'>{r.instances}</td><td>{e(r.state)}{reason}</td>"
            f"<td class='{e(verdict)}'>{e(verdict.replace('_', ' '))}</td>"
            f"<td class='num'>{score}</td>"
            f"<td>{pill}</td>"
            f"<td>{delivery}</td><td>{thumb}</td></tr>"
        )
    if not rows:
        out.append("<tr><td colspan='10'>no series received yet</td></tr>")
    out.append("</tbody></table></body></html>")
    return "".join(out)
