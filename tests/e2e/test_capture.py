"""The records against a packet capture of the same traffic, connection by connection.

tshark captures loopback while ab (HTTP and TLS 1.2) and curl (keep-alive, TLS 1.2) go through
`python -m balancer`; each access-log record is then checked against what the capture shows
for its connection. Skipped when tshark is missing or may not capture here.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from balancer.demo.certs import make_certs
from tests.e2e.conftest import BalancerProcess, need, run

pytestmark = pytest.mark.e2e

HANDSHAKE_TOLERANCE_SECONDS = 0.001  # measured: within ~30 µs on an idle machine
RTT_TOLERANCE_SECONDS = 0.0002


@dataclass
class Stream:
    """One TCP connection as the capture saw it, from the balancer's side of it."""

    fins: list[str] = field(default_factory=list)  # "peer" or "balancer", in order
    resets: set[str] = field(default_factory=set)
    alerts: set[str] = field(default_factory=set)  # TLS alert records after the handshake
    syn_ack_at: float | None = None
    handshake_ack_at: float | None = None
    client_hello_at: float | None = None
    server_finished_at: float | None = None
    ciphersuite: int | None = None
    tls13: bool = False
    payload: dict[str, int] = field(default_factory=lambda: {"peer": 0, "balancer": 0})  # bytes


def read_capture(
    pcap: Path, tls_port: int, listener_ports: set[int], farm_ports: set[int]
) -> dict[tuple[int, int], Stream]:
    fields = [
        "frame.time_epoch",
        "tcp.srcport",
        "tcp.dstport",
        "tcp.flags.syn",
        "tcp.flags.ack",
        "tcp.flags.fin",
        "tcp.flags.reset",
        "tls.record.content_type",
        "tls.handshake.type",
        "tls.handshake.ciphersuite",
        "tls.handshake.extensions.supported_version",
        "tcp.len",
        "tcp.seq",
    ]
    command = [
        "tshark",
        "-r",
        str(pcap),
        "-d",
        f"tcp.port=={tls_port},tls",
        "-T",
        "fields",
        "-E",
        "separator=|",
        *[arg for f in fields for arg in ("-e", f)],
    ]
    streams: dict[tuple[int, int], Stream] = defaultdict(Stream)
    for line in run(*command).stdout.splitlines():
        at, src, dst, syn, ack, fin, rst, content, kinds, suites, versions, size, seq = line.split(
            "|"
        )
        src_port, dst_port = int(src), int(dst)
        # Key each stream by (the far side's port, the near side's port) as the record names
        # them, and name the sender from the balancer's side of that leg.
        if src_port in listener_ports:
            key, sender = (dst_port, src_port), "balancer"
        elif dst_port in listener_ports:
            key, sender = (src_port, dst_port), "peer"
        elif src_port in farm_ports:  # backend leg: (balancer's local port, backend port)
            key, sender = (dst_port, src_port), "peer"
        else:
            key, sender = (src_port, dst_port), "balancer"
        stream = streams[key]
        # Payload by sequence numbers (relative: the first byte is 1), not by summing segments:
        # a bulk burst on loopback outruns the capture, which then drops some. A FIN or RST
        # carries the sender's next sequence number, so it bounds the span too.
        if int(size or 0):  # (not tcp.nxtseq: it counts a FIN riding on the last data segment)
            stream.payload[sender] = max(stream.payload[sender], int(seq) + int(size) - 1)
        elif syn != "1" and seq and (fin == "1" or (rst == "1" and sender not in stream.fins)):
            # (an RST after the sender's FIN is one past it: the FIN bounds that one)
            stream.payload[sender] = max(stream.payload[sender], int(seq) - 1)
        when = float(at)
        if syn == "1" and ack == "1":
            stream.syn_ack_at = when
        elif (
            ack == "1"
            and stream.syn_ack_at
            and stream.handshake_ack_at is None
            and sender == "peer"
        ):
            stream.handshake_ack_at = when
        if fin == "1":
            stream.fins.append(sender)
        if rst == "1":
            stream.resets.add(sender)
        contents, kind_list = content.split(","), kinds.split(",")
        if "1" in kind_list and sender == "peer" and stream.client_hello_at is None:
            stream.client_hello_at = when
        if "2" in kind_list and suites:
            stream.ciphersuite = int(suites.split(",")[0], 16)
            stream.tls13 = "0x0304" in versions.split(",")
        if sender == "balancer" and "20" in contents:
            stream.server_finished_at = when  # ChangeCipherSpec + Finished: handshake done
        if "21" in contents and stream.server_finished_at is not None:
            stream.alerts.add(sender)
    return streams


def reset_mid_response(port: int) -> None:
    """A client with a small receive window reads 64 KiB of a 300 kB response and resets: the
    record's client_out must be what left, not what the balancer had queued for it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # before the handshake
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /?size=300000 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 65536:
            received += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def iana_code(cipher_name: str) -> int:
    for cipher in ssl.create_default_context().get_ciphers():
        if cipher["name"] == cipher_name:
            return int(cipher["id"]) & 0xFFFF
    raise AssertionError(f"unknown cipher {cipher_name}")


@pytest.mark.parametrize("reuse", ["never", "safe", "always"])
def test_records_agree_with_a_packet_capture(farm_ports, tmp_path: Path, reuse: str) -> None:
    tshark, ab, curl = need("tshark"), need("ab"), need("curl")
    certs = make_certs(tmp_path / "certs")
    config = tmp_path / "reuse.toml"
    config.write_text(f'request_log = true\n[upstream]\nreuse = "{reuse}"\n')
    args = [
        "-c",
        str(config),
        "--http",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
        "--cert",
        str(certs.cert),
        "--key",
        str(certs.key),
        "--access-log",
        str(tmp_path / "access.log"),
    ]
    for port in farm_ports:
        args += ["--backend", f"127.0.0.1:{port}"]
    pcap = tmp_path / "capture.pcap"
    process = BalancerProcess(args, {"http", "https"}, tmp_path)
    with process as running:
        http, https = running.ports["http"], running.ports["https"]
        capture = start_capture(tshark, pcap, [http, https, *farm_ports])
        try:
            assert run(ab, "-n", "3", "-c", "1", running.url("http")).returncode == 0
            assert (
                run(ab, "-n", "3", "-c", "1", "-f", "TLS1.2", running.url("https")).returncode == 0
            )
            keep_alive = run(
                curl,
                "-s",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                running.url("http", "/a"),
                running.url("http", "/b"),
            )
            assert keep_alive.returncode == 0
            tls = run(  # (HTTP/1.1: h2's records are the capture test's below)
                curl,
                "-s",
                "-o",
                "/dev/null",
                "--http1.1",
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "--cacert",
                str(certs.ca),
                running.url("https"),
            )
            assert tls.returncode == 0
            reset_mid_response(http)
        finally:
            time.sleep(0.5)  # let the last FINs of the traffic reach the capture
    # Stopping the balancer closed the pooled backend connections (reuse modes): their FINs
    # reach the capture's file in its next write, which comes this long after at most.
    time.sleep(0.5)
    capture.send_signal(signal.SIGINT)
    capture.wait(20)
    assert capture.stderr is not None
    capture.stderr.close()

    lines = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    records = [r for r in lines if r["type"] == "connection" and r["requests"]]
    pooled = {r["id"]: r for r in lines if r["type"] == "backend_connection"}
    requests = [r for r in lines if r["type"] == "request"]
    assert len(records) == 3 + 3 + 1 + 1 + 1
    streams = read_capture(pcap, https, {http, https}, set(farm_ports))
    for record in records:
        where = f"connection {record['id']} from port {record['client']['port']}"
        client = streams[(record["client"]["port"], record["local_port"])]
        leg = record["client_leg"]
        if leg["first_fin"] is None:
            # A reset came before any FIN order could be known: the record must say so.
            assert leg["rst_received"] and "peer" in client.resets, (where, leg, client)
        else:
            assert client.fins and leg["first_fin"] == client.fins[0], (where, leg, client)
        assert leg["rst_sent"] == ("balancer" in client.resets), (where, client)
        # Bytes as the kernel counted them: the TCP payload each way, TLS records included.
        wire = (client.payload["peer"], client.payload["balancer"])
        assert (record["bytes"]["client_in"], record["bytes"]["client_out"]) == wire, where
        assert leg["rst_received"] == ("peer" in client.resets), (where, client)
        assert client.syn_ack_at is not None and client.handshake_ack_at is not None
        wire_rtt = client.handshake_ack_at - client.syn_ack_at
        assert abs(record["tcp_handshake_rtt_seconds"] - wire_rtt) < RTT_TOLERANCE_SECONDS, (
            where,
            record["tcp_handshake_rtt_seconds"],
            wire_rtt,
        )
        if record["tls"]:
            assert client.ciphersuite == iana_code(record["tls"]["cipher"]), where
            assert record["tls"]["version"] == "1.2" and not client.tls13, where
            assert client.client_hello_at is not None and client.server_finished_at is not None
            wire_handshake = client.server_finished_at - client.client_hello_at
            assert abs(record["tls"]["handshake_seconds"] - wire_handshake) < (
                HANDSHAKE_TOLERANCE_SECONDS
            ), (where, record["tls"], wire_handshake, client)
            assert leg["close_notify_received"] == ("peer" in client.alerts), (where, client)
            assert leg["close_notify_sent"] == ("balancer" in client.alerts), (where, client)
        if reuse == "never":
            bytes_in_out = (record["bytes"]["backend_in"], record["bytes"]["backend_out"])
            check_backend_leg(
                streams, where, record["backend"], record["backend_leg"], bytes_in_out
            )
        else:  # each request names a backend connection with a line of its own
            assert record["backend"] is None and record["backend_leg"] is None, where
    if reuse == "never":
        assert not pooled
        return
    assert len(requests) == sum(r["requests"] for r in records)
    # Every response completed, but perhaps the one the client reset mid-way (abandoned, no
    # status, unless the backend's whole answer was in before the reset).
    statuses = [r["status"] for r in requests]
    assert set(statuses) <= {200, None} and statuses.count(None) <= 1
    assert {r["backend_connection_id"] for r in requests} <= pooled.keys()
    if reuse == "always":  # ab's new connections took idle backend connections
        assert len(pooled) < len(requests)
    for conn in pooled.values():
        where = f"backend connection {conn['id']}"
        bytes_in_out = (conn["bytes"]["in"], conn["bytes"]["out"])
        check_backend_leg(streams, where, conn, conn["leg"], bytes_in_out)


def check_backend_leg(
    streams: dict[tuple[int, int], Stream],
    where: str,
    backend: dict,
    leg: dict,
    bytes_in_out: tuple[int, int],
) -> None:
    """A backend leg's record against its stream: first FIN, no resets, bytes each way, and
    the teardown facts every leg that ended by FIN has."""
    stream = streams[(backend["local_port"], int(backend["address"].rsplit(":", 1)[1]))]
    assert stream.fins, (where, stream)
    assert leg["first_fin"] == stream.fins[0], (where, leg, stream)
    assert bytes_in_out == (stream.payload["peer"], stream.payload["balancer"]), where
    assert leg["teardown_seconds"] is not None, (where, leg)
    assert leg["retransmits"] is not None, (where, leg)
    assert not stream.resets, (where, stream)


TCP_SERVER = """
import asyncio, sys
async def serve(reader, writer):
    writer.write(b"hello\\n")
    line = await reader.readline()
    if line == b"bye\\n":  # an XMPP server's logout: its FIN first
        writer.write(b"bye\\n")
        writer.close()
        return
    await asyncio.sleep(3600)  # held open until the process is killed
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_tcp_mode_records_agree_with_a_capture(tmp_path: Path) -> None:
    """A tcp-mode service whose server closes first (the client's last bytes then draw its
    RST), and one whose server is killed with connections open: each record's close cause,
    and each leg's first FIN, resets and bytes, against the wire."""
    tshark = need("tshark")
    server = subprocess.Popen([sys.executable, "-c", TCP_SERVER], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert server.stdout is not None
    backend_port = int(server.stdout.readline())
    config = tmp_path / "tcp.toml"
    config.write_text(
        '[[listeners]]\nname = "xmpp"\nbind = "127.0.0.1:0"\nmode = "tcp"\n'
        f'[[backends]]\nname = "xmpp1"\naddress = "127.0.0.1:{backend_port}"\n'
    )
    args = ["-c", str(config), "--workers", "1", "--access-log", str(tmp_path / "access.log")]
    pcap = tmp_path / "capture.pcap"
    try:
        with BalancerProcess(args, {"xmpp"}, tmp_path) as running:
            port = running.ports["xmpp"]
            capture = start_capture(tshark, pcap, [port, backend_port])
            try:
                for _ in range(2):  # the server closes first; the client's last bytes follow
                    with socket.create_connection(("127.0.0.1", port), 5) as client:
                        assert client.recv(100) == b"hello\n"
                        client.sendall(b"bye\n")
                        assert read_to_eof(client) == b"bye\n"
                        client.sendall(b"</stream:stream>")  # after the server's FIN
                        time.sleep(0.2)  # its RST comes back before the client closes
                held = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(2)]
                for client in held:
                    assert client.recv(100) == b"hello\n"
                server.kill()  # its kernel closes every socket it held: FINs
                server.wait(5)
                for client in held:
                    assert read_to_eof(client) == b""
                    client.close()
            finally:
                time.sleep(0.5)  # the last FINs and RSTs reach the capture
                capture.send_signal(signal.SIGINT)
                capture.wait(20)
                if capture.stderr is not None:
                    capture.stderr.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)
        server.stdout.close()
    records = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert len(records) == 4
    streams = read_capture(pcap, 0, {port}, {backend_port})
    for record in records:
        where = f"connection {record['id']} from port {record['client']['port']}"
        assert record["close_cause"] == "backend_closed", where  # it ended first, every time
        client = streams[(record["client"]["port"], record["local_port"])]
        backend = streams[(record["backend"]["local_port"], backend_port)]
        for leg, stream in ((record["client_leg"], client), (record["backend_leg"], backend)):
            assert stream.fins and leg["first_fin"] == stream.fins[0], (where, leg, stream)
            assert leg["rst_received"] == ("peer" in stream.resets), (where, leg, stream)
            assert leg["rst_sent"] == ("balancer" in stream.resets), (where, leg, stream)
            assert leg["kind"] == ("rst" if stream.resets else "fin"), (where, leg, stream)
        assert record["backend_leg"]["first_fin"] == "peer", where
        wire = (client.payload["peer"], client.payload["balancer"])
        assert (record["bytes"]["client_in"], record["bytes"]["client_out"]) == wire, where


def test_h2_records_agree_with_a_decrypted_capture(farm_ports, tmp_path: Path) -> None:
    """HTTP/2 (ALPN h2, TLS 1.3): each connection's ALPN, streams, and GOAWAY frames (who
    sent one first, each side's error code and last stream) against the capture, decrypted
    with the client's TLS secrets. One client leaves with GOAWAY first; one breaks the
    protocol and is told GOAWAY PROTOCOL_ERROR first."""
    from tests.h2client import H2Client

    tshark = need("tshark")
    certs = make_certs(tmp_path / "certs")
    config = tmp_path / "h2.toml"
    backends = "".join(f'[[backends]]\naddress = "127.0.0.1:{p}"\n' for p in farm_ports)
    config.write_text(
        '[[listeners]]\nname = "https"\nbind = "127.0.0.1:0"\ntls = true\n'
        f'alpn = ["h2", "http/1.1"]\n[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n' + backends
    )
    args = ["-c", str(config), "--workers", "1", "--access-log", str(tmp_path / "access.log")]
    pcap, keylog = tmp_path / "capture.pcap", tmp_path / "keys.log"
    with BalancerProcess(args, {"https"}, tmp_path) as running:
        port = running.ports["https"]
        capture = start_capture(tshark, pcap, [port])
        try:
            leaving = H2Client(port, str(certs.ca), keylog=str(keylog))
            streams = [leaving.request("/a"), leaving.request("/b")]
            leaving.read_until(leaving.all_done)
            leaving.close()  # GOAWAY (NO_ERROR, last stream 0), then FIN
            breaking = H2Client(port, str(certs.ca), keylog=str(keylog))
            first = breaking.request("/c")
            breaking.read_until(breaking.all_done)
            breaking.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
            breaking.read_until(lambda: False)
            breaking.close()
        finally:
            time.sleep(0.5)  # the last frames reach the capture
            capture.send_signal(signal.SIGINT)
            capture.wait(20)
            if capture.stderr is not None:
                capture.stderr.close()
    records = {
        r["client"]["port"]: r
        for r in map(json.loads, (tmp_path / "access.log").read_text().splitlines())
        if r["type"] == "connection"
    }
    assert len(records) == 2
    frames = run(
        tshark, "-r", str(pcap), "-o", f"tls.keylog_file:{keylog}", "-d", f"tcp.port=={port},tls",
        "-T", "fields", "-E", "separator=|", "-e", "tcp.srcport", "-e", "tcp.dstport",
        "-e", "tls.handshake.extensions_alpn_str", "-e", "http2.type", "-e", "http2.streamid",
        "-e", "http2.goaway.error", "-e", "http2.goaway.last_stream_id",
    ).stdout.splitlines()  # fmt: skip
    seen: dict[int, dict[str, list[tuple[str, int, int]]]] = defaultdict(
        lambda: {"goaway": [], "headers_in": [], "alpn": []}
    )
    for line in frames:
        src, dst, alpn, types, ids, errors, lasts = (line.split("|") + [""] * 7)[:7]
        client_port, sender = (int(dst), "balancer") if int(src) == port else (int(src), "peer")
        if alpn and sender == "balancer":
            seen[client_port]["alpn"].append((alpn, 0, 0))
        kinds, stream_ids = types.split(","), ids.split(",")
        goaways = iter(zip(errors.split(","), lasts.split(","), strict=True))
        for kind, stream_id in zip(kinds, stream_ids, strict=False):
            if kind == "7":  # GOAWAY
                error, last = next(goaways)
                seen[client_port]["goaway"].append((sender, int(error, 0), int(last)))
            elif kind == "1" and sender == "peer":  # HEADERS: a request
                seen[client_port]["headers_in"].append((sender, int(stream_id), 0))
    assert set(seen) == set(records)
    codes = {"no_error": 0, "protocol_error": 1}
    for client_port, record in records.items():
        wire, h2 = seen[client_port], record["h2"]
        assert record["tls"]["alpn"] == "h2" and [a for a, _, _ in wire["alpn"]] == ["h2"]
        assert h2["streams"] == len(wire["headers_in"])  # a HEADERS frame a request
        first_goaway = wire["goaway"][0]
        assert h2["goaway_first"] == first_goaway[0]
        for direction, sender in (("goaway_sent", "balancer"), ("goaway_received", "peer")):
            said = [(error, last) for who, error, last in wire["goaway"] if who == sender]
            fact = h2[direction]
            assert (fact is None) == (not said), (direction, fact, said, record, wire)
            if fact is not None:
                assert (codes[fact["error"]], fact["last_stream"]) == said[-1]  # the last
    by_cause = {r["close_cause"]: r for r in records.values()}
    assert by_cause["h2_error"]["h2"]["goaway_sent"] == {"error": "protocol_error",
                                                          "last_stream": first}  # fmt: skip
    assert by_cause["client_closed"]["h2"]["streams"] == len(streams)


def start_capture(tshark: str, pcap: Path, ports: list[int]) -> subprocess.Popen[str]:
    capture = subprocess.Popen(
        [tshark, "-i", "lo", "-w", str(pcap), "-f", " or ".join(f"tcp port {p}" for p in ports)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert capture.stderr is not None
    started, line = time.monotonic(), ""
    while "Capture started" not in line:  # "Capturing on" comes before it really does
        line = capture.stderr.readline()
        if not line or time.monotonic() - started > 20:
            capture.kill()
            capture.wait()
            capture.stderr.close()
            pytest.skip(f"tshark cannot capture on lo here: {line.strip()}")
    return capture


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
