"""A local CA and a server certificate signed by it, made with `cryptography`.

ECDSA P-256 by default: it signs far faster than RSA-2048, so full handshakes cost the balancer
less. `key_type="rsa"` gives RSA-2048 for clients or comparisons that need it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPES = ("ecdsa", "rsa")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class CertPaths:
    ca: Path
    cert: Path
    key: Path


class CertsExist(Exception):
    """ca.crt, server.crt and server.key are all there already: kept, not replaced."""

    def __init__(self, paths: CertPaths) -> None:
        super().__init__("the local CA and server certificate")
        self.paths = (paths.ca, paths.cert, paths.key)


class CertsIncomplete(Exception):
    """Some of the three files exist and some do not: no safe way to complete the set."""


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_certs(
    directory: Path,
    hosts: list[str] | None = None,
    key_type: str = "ecdsa",
    days: int = 825,
    force: bool = False,
) -> CertPaths:
    """Write ca.crt, server.crt and server.key (mode 0600) into `directory`.

    SANs: localhost, 127.0.0.1, ::1 and every name or address in `hosts`. Existing files are
    kept unless `force`: a client that trusts the CA would break if it were replaced
    (CertsExist when all three are there; CertsIncomplete when only some are, since the CA's
    key is not kept and a new server certificate needs a new CA).
    """
    paths = CertPaths(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    present = [path for path in (paths.ca, paths.cert, paths.key) if path.exists()]
    if present and not force:
        if len(present) == 3:
            raise CertsExist(paths)
        missing = sorted({paths.ca, paths.cert, paths.key} - set(present))
        raise CertsIncomplete(
            f"{', '.join(map(str, present))} exist but {', '.join(map(str, missing))} do not; "
            "the CA's key is not kept, so the set can only be made anew: "
            "`balancer certs --force` replaces all three (clients must then trust the new CA)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = _new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "balancer local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", "::1", *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = _new_key(key_type)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(key_pem)
    os.chmod(paths.key, 0o600)
    return paths
