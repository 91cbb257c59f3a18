"""Certificates near their notAfter: `check` and `run` warn (issue 20, item 4)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from balancer.config.schema import parse_config
from balancer.net.tls import certificate_not_after, expiry_warnings

NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.UTC)


def certificate(path: Path, not_after: datetime.datetime) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def tls_config(cert: str, *more: str) -> object:
    return parse_config(
        {
            "listeners": [{"name": "https", "bind": "127.0.0.1:0", "tls": True}],
            "backends": [{"address": "127.0.0.1:1"}],
            "tls": {
                "cert": cert,
                "key": "k.pem",
                "certificates": [{"cert": c, "key": "k.pem"} for c in more],
            },
        },
        "t.toml",
    )


def test_an_expired_or_nearly_expired_certificate_is_warned_of(tmp_path: Path) -> None:
    fresh = certificate(tmp_path / "fresh.pem", NOW + datetime.timedelta(days=60))
    soon = certificate(tmp_path / "soon.pem", NOW + datetime.timedelta(days=5, hours=1))
    gone = certificate(tmp_path / "gone.pem", NOW - datetime.timedelta(days=1))
    warnings = expiry_warnings(tls_config(fresh, soon, gone), NOW)  # type: ignore[arg-type]
    assert warnings == [
        f"t.toml: tls.certificates[0].cert = {soon!r}: expires in 5 day(s), at "
        "2026-12-10T13:00:00Z; renew it",
        f"t.toml: tls.certificates[1].cert = {gone!r}: expired at 2026-12-04T12:00:00Z; renew it",
    ]
    assert certificate_not_after(fresh) == NOW + datetime.timedelta(days=60)


def test_no_tls_listener_no_certificate_read(tmp_path: Path) -> None:
    plain = parse_config(
        {"listeners": [{"name": "http", "bind": "127.0.0.1:0"}],
         "backends": [{"address": "127.0.0.1:1"}], "tls": {"cert": "missing.pem"}},
        "t.toml",
    )  # fmt: skip
    assert expiry_warnings(plain, NOW) == []
