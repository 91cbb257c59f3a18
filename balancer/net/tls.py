"""TLS for the client leg: the server context, and a session driven over memory BIOs.

Driving `ssl.SSLObject` ourselves (rather than `create_server(ssl=...)` or `start_tls`) lets the
proxy see what an operator would otherwise open Wireshark for: when the ClientHello arrived, when
the handshake finished or why it failed (with the alert OpenSSL sent), and whether the client's
close_notify came before its FIN.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from balancer.config.schema import Config, TLSConfig

_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERSION_NAMES: Final = {"TLSv1.2": "1.2", "TLSv1.3": "1.3"}
# A read returns at most one record's plaintext (2^14 bytes); asking for more only makes
# Python allocate a larger buffer to shrink.
_RECORD_PLAINTEXT_MAX: Final = 16384

NOT_TLS: Final = "not_tls"  # plain HTTP or junk where a ClientHello was due
# OpenSSL reason codes → the bounded set of failure reasons used as metric labels.
_FAILURE_REASONS: Final = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "HTTP_REQUEST": NOT_TLS,
    "HTTPS_PROXY_REQUEST": NOT_TLS,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "UNKNOWN_PROTOCOL": NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": NOT_TLS,
    "RECORD_LAYER_FAILURE": NOT_TLS,
}


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message says what to run."""


class TLSHandshakeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def failure_reason(error: ssl.SSLError) -> str:
    """A bounded label for a failed handshake: protocol_version, not_tls, alert_<name>, ..."""
    code = error.reason or ""
    if code in _FAILURE_REASONS:
        return _FAILURE_REASONS[code]
    if "_ALERT_" in code:  # the client sent us an alert, e.g. TLSV1_ALERT_UNKNOWN_CA
        return "alert_" + code.split("_ALERT_", 1)[1].lower()
    return "other"


def server_context(
    config: TLSConfig,
    alpn: list[str] | None = None,
    pairs: list[tuple[str, str, str]] | None = None,
) -> ssl.SSLContext:
    """A server context: TLS 1.2+ (configurable), AEAD ECDHE suites, no compression or
    renegotiation. With more than one certificate, one context more per pair, chosen by the
    ClientHello's SNI among the names its certificate holds (exact names first, then
    wildcards; a name two hold is the first's, the default first). The pairs are [tls]
    cert/key (the default) and [[tls.certificates]], or `pairs` (where each is configured,
    cert, key; the first the default): a listener's own. Raises TLSSetupError naming the
    file and the fix."""
    if pairs is None:
        pairs = [("tls", config.cert, config.key)]
        pairs += [(f"tls.certificates[{i}]", *pair) for i, pair in enumerate(config.certificates)]
    (default, cert, key), more = pairs[0], pairs[1:]
    context = _context(config, cert, key, default, alpn)
    if not more:  # one certificate: served whatever the SNI
        return context
    by_name: dict[str, ssl.SSLContext] = {}
    for where, cert, key in pairs:
        other = context if where == default else _context(config, cert, key, where, alpn)
        try:
            names = certificate_names(cert)
        except ValueError as error:
            raise TLSSetupError(
                f"{where}.cert = {cert!r}: not a PEM certificate ({error})"
            ) from None
        if not names and where != default:  # (the default needs none: it is the default)
            raise TLSSetupError(f"{where}.cert = {cert!r}: holds no DNS name (subjectAltName "
                                "or CN) to be chosen by")  # fmt: skip
        for name in names:
            by_name.setdefault(name, other)  # the first pair to hold a name (cert/key first)

    def choose(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        obj.balancer_sni = name  # type: ignore[attr-defined]
        if name is None:
            return
        name = name.lower()
        chosen = by_name.get(name) or by_name.get("*." + name.partition(".")[2])
        if chosen is not None:
            obj.context = chosen

    context.sni_callback = choose
    return context


EXPIRY_WARNING_DAYS: Final = 14  # check and run warn of a certificate this close to its notAfter


def configured_pairs(config: Config) -> list[tuple[str, str, str]]:
    """(where, cert, key) of every pair the TLS listeners serve: [tls] cert/key, each
    [[tls.certificates]] pair, each listener's own."""
    tls = config.tls
    if tls is None or not any(listener.tls for listener in config.listeners):
        return []
    found = [("tls", tls.cert, tls.key)]
    found += [(f"tls.certificates[{i}]", *pair) for i, pair in enumerate(tls.certificates)]
    for index, listener in enumerate(config.listeners):
        if listener.tls:
            found += [
                (f"listeners[{index}].certificates[{i}]", *pair)
                for i, pair in enumerate(listener.certificates)
            ]
    return found


def configured_certificates(config: Config) -> list[tuple[str, str]]:
    """(where, path) of every certificate the TLS listeners serve."""
    return [(f"{where}.cert", cert) for where, cert, _ in configured_pairs(config)]


def certificate_problems(config: Config) -> list[str]:
    """What is wrong with every pair the TLS listeners would serve, each problem once:
    loading the contexts stops at the first, and `check` says them all in one run."""
    tls = config.tls
    problems: list[str] = []
    for where, cert, key in configured_pairs(config):
        assert tls is not None  # (pairs are configured only with [tls])
        unread = [_unreadable(where, name, path) for name, path in (("cert", cert), ("key", key))]
        if any(unread):
            problems += [problem for problem in unread if problem is not None]
            continue
        try:
            _context(tls, cert, key, where, None)
        except TLSSetupError as error:
            problems.append(str(error))
    return list(dict.fromkeys(problems))  # (a cipher list's problem is every pair's)


def _unreadable(where: str, name: str, path: str) -> str | None:
    problem = unreadable(path)
    if problem is None:
        return None
    return (
        f"{where}.{name} = {path!r}: cannot read: {problem}. Run `balancer certs` to make a "
        "local CA and server certificate in certs/, or set tls.cert and tls.key "
        "(--cert/--key) to yours."
    )


def certificate_not_after(path: str) -> datetime.datetime:
    with open(path, "rb") as file:
        return x509.load_pem_x509_certificate(file.read()).not_valid_after_utc


def expiry_warnings(config: Config, now: datetime.datetime) -> list[str]:
    """A line for each certificate that has expired or expires within EXPIRY_WARNING_DAYS
    (HAProxy and nginx serve an expired certificate too; clients will refuse it)."""
    warnings = []
    for where, path in configured_certificates(config):
        try:
            not_after = certificate_not_after(path)
        except (OSError, ValueError):
            continue  # unreadable: the context's loading says so, as an error
        left = not_after - now
        when = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if left.total_seconds() <= 0:
            warnings.append(f"{config.source}: {where} = {path!r}: expired at {when}; renew it")
        elif left.days < EXPIRY_WARNING_DAYS:
            warnings.append(
                f"{config.source}: {where} = {path!r}: expires in {left.days} day(s), at "
                f"{when}; renew it"
            )
    return warnings


def certificate_names(path: str) -> list[str]:
    """The DNS names a PEM certificate is for: its subjectAltName entries, else its CN."""
    with open(path, "rb") as file:
        certificate = x509.load_pem_x509_certificate(file.read())
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(name).lower() for name in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value).lower()
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return names


def _context(
    config: TLSConfig, cert: str, key: str, where: str, alpn: list[str] | None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.min_version]
    if config.max_version:
        context.maximum_version = _VERSIONS[config.max_version]
    try:
        context.set_ciphers(config.ciphers)
    except ssl.SSLError:
        raise TLSSetupError(
            f"tls.ciphers = {config.ciphers!r}: OpenSSL accepts none of these"
        ) from None
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not config.session_tickets:
        context.options |= ssl.OP_NO_TICKET
    for name, path in (("cert", cert), ("key", key)):
        problem = _unreadable(where, name, path)
        if problem is not None:
            raise TLSSetupError(problem)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as error:
        raise TLSSetupError(
            f"{where}: cert {cert!r} and key {key!r} do not load as a matching PEM "
            f"pair ({error}). Run `balancer certs` for a fresh pair, or fix the paths."
        ) from None
    if alpn:
        context.set_alpn_protocols(alpn)
    context.sni_callback = _remember_sni
    return context


def unreadable(path: str) -> str | None:
    """Why `path` cannot be read ("no such file", "permission denied", ...), or None.

    load_cert_chain() reports a missing key as a missing certificate (its FileNotFoundError
    has no file name), so each file is opened first, to name the one at fault."""
    try:
        with open(path, "rb"):
            return None
    except IsADirectoryError:
        return "it is a directory"
    except OSError as error:
        return (error.strerror or str(error)).lower()


def _remember_sni(obj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
    obj.balancer_sni = name  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class SessionFacts:
    version: str
    cipher: str
    resumed: bool
    sni: str | None
    alpn: str | None


class TLSSession:
    """A server-side TLS session over memory BIOs: ciphertext in, plaintext out, and back.

    After every `receive()` the caller sends `take_output()` to the peer (handshake flights,
    alerts, tickets). `receive()` raises TLSHandshakeFailed while handshaking (the alert to send is
    in `take_output()`), ssl.SSLError afterwards.
    """

    __slots__ = ("_in", "_obj", "_out", "close_notify_received", "close_notify_sent", "established")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.established = False
        self.close_notify_received = False
        self.close_notify_sent = False

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext; return the plaintext it completes (b"" if none yet)."""
        self._in.write(data)
        obj = self._obj
        if not self.established:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError as error:
                raise TLSHandshakeFailed(failure_reason(error), str(error)) from None
            self.established = True
        chunks = []
        incoming = self._in
        while True:
            try:
                chunk = obj.read(_RECORD_PLAINTEXT_MAX)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self.close_notify_received = True
                break
            chunks.append(chunk)
            if not incoming.pending and not obj.pending():
                break  # all records read: asking again would only raise SSLWantReadError
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, plaintext: bytes) -> bytes:
        """Encrypt; return the records to write to the peer."""
        self._obj.write(plaintext)
        return self._out.read()

    def take_output(self) -> bytes:
        return self._out.read() if self._out.pending else b""

    def close(self) -> bytes:
        """Our close_notify, as records to write (b"" if the handshake never finished)."""
        if not self.established or self.close_notify_sent:
            return b""
        self.close_notify_sent = True
        # unwrap() also wants the peer's close_notify and raises without it; ours is written.
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
        return self._out.read()

    def facts(self) -> SessionFacts:
        obj = self._obj
        version = obj.version() or ""
        cipher = obj.cipher()
        return SessionFacts(
            version=_VERSION_NAMES.get(version, version),
            cipher=cipher[0] if cipher else "",
            resumed=obj.session_reused,
            sni=getattr(obj, "balancer_sni", None),
            alpn=obj.selected_alpn_protocol(),
        )
