"""Throw-away PKI for the TLS tests, made on the fly with the ``openssl`` command line tool.

``make_pki(folder)`` writes (all PEM, keys unencrypted, valid for two days):

* ``ca1``: the trusted CA; ``ca2``: an unrelated CA nobody trusts;
* ``server``: the server certificate for 127.0.0.1 / localhost (SAN IP + DNS), signed by CA1;
* ``server_wrong_name``: signed by CA1 but only for ``pacs.invalid`` (hostname check);
* ``client``: a client certificate signed by CA1 (trusted);
* ``client_ca2``: a client certificate signed by CA2 (untrusted);
* ``client_self``: a self-signed client certificate.

RSA 2048 keeps every DCMTK security profile happy; the whole set takes well under a second.
``cryptography`` is not a dependency of the project, hence the CLI.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAYS = "2"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def as_dest_tls(self, ca: Path) -> dict[str, str]:
        return {"certificate": str(self.cert), "private_key": str(self.key), "ca_certificate": str(ca)}


@dataclass(frozen=True)
class PKI:
    folder: Path
    ca1: KeyPair
    ca2: KeyPair
    server: KeyPair
    server_wrong_name: KeyPair
    client: KeyPair
    client_ca2: KeyPair
    client_self: KeyPair


def _openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        import pytest

        pytest.fail("openssl not found: install the Debian package openssl (see .ci/run)")
    return exe


def _run(*args: str) -> None:
    r = subprocess.run([_openssl(), *args], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{r.stderr}")


def _serial() -> str:
    return "0x" + secrets.token_hex(15)


def _ca(folder: Path, name: str, cn: str) -> KeyPair:
    kp = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(kp.key), "-out",
         str(kp.cert), "-days", DAYS, "-subj", f"/O=triage-agent tests/CN={cn}", "-set_serial",
         _serial(), "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return kp


def _leaf_ext(usage: str, san: str | None) -> list[str]:
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}",
             "subjectKeyIdentifier=hash"]
    if san:
        lines.append(f"subjectAltName={san}")
    return lines


def _leaf(folder: Path, name: str, cn: str, ca: KeyPair, usage: str,
          san: str | None = None) -> KeyPair:
    kp = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text("\n".join([*_leaf_ext(usage, san), "authorityKeyIdentifier=keyid,issuer"]) + "\n")
    _run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(kp.key), "-out", str(csr),
         "-subj", f"/O=triage-agent tests/CN={cn}")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
         "-set_serial", _serial(), "-days", DAYS, "-sha256", "-extfile", str(ext),
         "-out", str(kp.cert))
    csr.unlink()
    ext.unlink()
    return kp


def _self_signed_leaf(folder: Path, name: str, cn: str, usage: str) -> KeyPair:
    kp = KeyPair(folder / f"{name}.pem", folder / f"{name}.key")
    args: list[str] = []
    for e in _leaf_ext(usage, None):
        args += ["-addext", e]
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(kp.key), "-out",
         str(kp.cert), "-days", DAYS, "-subj", f"/O=triage-agent tests/CN={cn}", "-set_serial",
         _serial(), *args)
    return kp


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca1 = _ca(folder, "ca1", "Triage Test CA 1")
    ca2 = _ca(folder, "ca2", "Unrelated Test CA 2")
    return PKI(
        folder=folder,
        ca1=ca1,
        ca2=ca2,
        server=_leaf(folder, "server", "localhost", ca1, "serverAuth",
                     "IP:127.0.0.1,DNS:localhost"),
        server_wrong_name=_leaf(folder, "server_wrong_name", "pacs.invalid", ca1, "serverAuth",
                                "DNS:pacs.invalid"),
        client=_leaf(folder, "client", "MODALITY", ca1, "clientAuth"),
        client_ca2=_leaf(folder, "client_ca2", "ROGUE", ca2, "clientAuth"),
        client_self=_self_signed_leaf(folder, "client_self", "SELFSIGNED", "clientAuth"),
    )


def security_section(tls: dict[str, Any], **other: Any) -> dict[str, Any]:
    """A ``[security]`` section for ``tests.conftest.write_config`` holding ``[security.tls]``.

    ``write_config`` writes ``key = json.dumps(value)``, which cannot express a nested table (a
    JSON object is not a TOML inline table); TOML dotted keys (``tls.certificate = "..."``) can.
    """
    out = dict(other)
    out.update({f"tls.{k}": v for k, v in tls.items()})
    return out


def dcmtk_tls_args(pki: PKI, client: KeyPair | None, *, ca: Path | None = None) -> list[str]:
    """DCMTK SCU options: TLS with ``client`` (or anonymous TLS), trusting ``ca`` (default CA1)."""
    ca = ca or pki.ca1.cert
    head = ["+tls", str(client.key), str(client.cert)] if client else ["+tla"]
    return [*head, "+cf", str(ca)]
