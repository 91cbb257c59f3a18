"""HTTP/2 to clients (ALPN h2 on a TLS listener that offers it): streams as requests to
HTTP/1.1 backends, flow control both ways, resets and GOAWAY, over real sockets; curl's
--http2 and python-hyper's h2 (tests/h2client.py) as the clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import shutil
import ssl
from typing import Any

import pytest

from balancer.config.schema import ConfigError, parse_config
from tests.h2client import Answer, H2Client
from tests.helpers import client_context, pattern, port_of, scrape, start_balancer

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def h2_config(backends: list[str], certs: Any, alpn: list[str] | None = None, **extra: Any) -> Any:
    listener: dict[str, Any] = {"name": "https", "bind": "127.0.0.1:0", "tls": True}
    listener["alpn"] = ["h2", "http/1.1"] if alpn is None else alpn
    table: dict[str, Any] = {
        "listeners": [listener],
        "backends": [{"name": f"b{i}", "address": a} for i, a in enumerate(backends)],
        "tls": {"cert": str(certs.cert), "key": str(certs.key)},
        "request_log": True,
        "admin": "127.0.0.1:0",
        **extra,
    }
    return parse_config(table, "test")


@pytest.fixture
async def h2_balancer(farm, certs):
    started = []

    async def start(backends: list[str] | None = None, **extra: Any) -> Any:
        log = io.StringIO()
        config = h2_config(backends or [b.address for b in farm], certs, **extra)
        balancer, recorder = await start_balancer(config, access_log=log)
        started.append(balancer)
        return port_of(balancer), recorder, log, balancer

    yield start
    for balancer in started:
        await balancer.shutdown(grace=1.0)


@pytest.fixture
async def h2_client(certs):
    """`await h2_client(port)`: a connected H2Client, closed after the test whatever happens."""
    clients: list[H2Client] = []

    async def connect(port: int) -> H2Client:
        client = await asyncio.to_thread(H2Client, port, str(certs.ca))
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def request_lines(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line.get("type") == "request"]


async def in_thread(client: H2Client, done: Any = None) -> None:
    await asyncio.to_thread(client.read_until, done or client.all_done)


async def until(condition: Any, timeout: float = 5.0) -> None:
    """A condition of the backends' (in this loop): checked each loop round, bounded."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def seen(farm: Any, path: str) -> bool:
    return any(request.path == path for backend in farm for request in backend.seen)


async def test_curl_http2_is_answered_over_h2_and_recorded(h2_balancer, certs, farm) -> None:
    port, recorder, log, _ = await h2_balancer()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2", "--cacert", str(certs.ca), "-w", "\n%{http_version}",
        "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/hello",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    body, version = out.decode().rsplit("\n", 1)
    assert version == "2"
    assert body.endswith("GET /hello\n")  # the backend's own answer
    (record,) = await recorder.wait_for(1)
    assert record.tls_alpn == "h2"
    assert record.requests == 1
    assert record.h2 is not None
    assert (record.h2.streams, record.h2.max_concurrent_streams) == (1, 1)
    assert record.h2.goaway_sent is None  # (curl 7.88 leaves without a GOAWAY of its own)
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    (connection_line,) = [line for line in lines if line["type"] == "connection"]
    assert connection_line["h2"]["streams"] == 1
    (line,) = request_lines(log)
    assert line["stream"] == 1 and line["status"] == 200 and line["host"] == f"localhost:{port}"
    # The backend heard HTTP/1.1 with the forwarding headers an HTTP/1.1 client's request gets.
    (request,) = [seen for backend in farm for seen in backend.seen]
    assert request.header("host") == f"localhost:{port}"
    assert request.header("x-forwarded-for") == "127.0.0.1"
    assert request.header("x-forwarded-proto") == "https"
    assert request.header("x-forwarded-port") == str(port)
    assert request.header("connection") is None  # kept: for this connection's next stream


async def test_streams_of_one_connection_run_at_once_on_several_backends(
    h2_balancer, h2_client, farm
) -> None:
    port, recorder, log, balancer = await h2_balancer()
    client = await h2_client(port)
    assert client.alpn == "h2"
    # Slow answers first: had they been served one after another, the fast ones would wait.
    slow = [client.request("/delay/300") for _ in range(3)]
    fast = [client.request(f"/fast/{n}") for n in range(9)]
    await in_thread(client, lambda: all(client.answers[s].ended for s in fast))
    assert not any(client.answers[s].ended for s in slow)  # still waiting: streams interleave
    await in_thread(client)
    answers = [client.answers[s] for s in slow + fast]
    assert all(a.status == 200 for a in answers)
    assert {a.headers[b"x-backend"] for a in answers} == {b"web1", b"web2", b"web3"}
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.requests == 12
    assert record.h2 is not None and record.h2.streams == 12
    assert record.h2.max_concurrent_streams >= 4  # the three slow ones and a fast one at least
    assert record.h2.goaway_received == ("no_error", 0)  # the client's, as it closed
    assert (record.h2.goaway_first, record.h2.goaway_sent) == ("peer", None)
    metrics = await scrape(balancer)
    assert 'balancer_client_requests_total{listener="https",protocol="h2"} 12.0' in metrics
    assert 'balancer_h2_max_concurrent_streams_count{listener="https"} 1.0' in metrics
    lines = request_lines(log)
    assert sorted(line["stream"] for line in lines) == sorted(slow + fast)
    assert all(line["connection_id"] == record.id for line in lines)


async def test_a_request_body_without_length_goes_chunked_and_whole(h2_balancer, h2_client) -> None:
    port, _, log, _ = await h2_balancer()
    body = pattern(1_000_000)  # fifteen times the initial window: credited back as written
    client = await h2_client(port)
    stream = client.request("/upload", method="POST", body=body, length=False)
    await in_thread(client)
    answer = client.answers[stream]
    assert answer.status == 200
    assert answer.headers[b"x-body-sha256"] == hashlib.sha256(body).hexdigest().encode()
    assert bytes(answer.body) == body  # the backend echoes it
    client.close()
    (line,) = request_lines(log) or [None]
    assert line is not None and line["bytes"]["request_body"] == len(body)


async def test_a_large_response_flows_through_the_clients_windows(h2_balancer, h2_client) -> None:
    port, _, _, _ = await h2_balancer()
    client = await h2_client(port)
    plain, chunked = client.request("/size/3000000"), client.request("/chunked/200000")
    await in_thread(client)
    assert bytes(client.answers[plain].body) == pattern(3_000_000)
    assert bytes(client.answers[chunked].body) == pattern(200_000)
    assert b"transfer-encoding" not in client.answers[chunked].headers  # (hop-by-hop)
    client.close()


@pytest.mark.parametrize("reuse", ["never", "always"])
async def test_streams_leave_nothing_to_the_cyclic_gc(h2_balancer, h2_client, reuse) -> None:
    """Every stream's objects go when it ends (no reference cycle left for the collector:
    its passes cost a tenth of a stream's CPU when a response reader and its parser kept
    each other), responses chunked or not."""
    import gc

    port, _, _, _ = await h2_balancer(upstream={"reuse": reuse})
    client = await h2_client(port)
    for path in ("/", "/chunked/1000"):  # (warm: first-time objects are not per stream)
        client.request(path)
    await in_thread(client)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            client.request("/")
            client.request("/chunked/1000")
        await in_thread(client)
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith(("balancer", "httptools"))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert all(a.status == 200 for a in client.answers.values()) and len(client.answers) == 42
    assert ours == []
    client.close()


async def test_a_stream_the_client_resets_ends_alone(h2_balancer, h2_client, farm) -> None:
    port, recorder, log, _ = await h2_balancer()
    client = await h2_client(port)
    hanging = client.request("/slow")  # the backend never answers it
    await until(lambda: seen(farm, "/slow"))  # its backend connection is open
    await asyncio.to_thread(client.reset, hanging)
    other = client.request("/after")
    await in_thread(client, lambda: client.answers[other].ended)
    assert client.answers[other].status == 200
    client.close()
    # The reset stream's backend connection was closed, not left to its timeout.
    slow_backend = next(b for b in farm if any(s.path == "/slow" for s in b.seen))
    await until(lambda: not slow_backend.open_connections)
    lines = {line["stream"]: line for line in request_lines(log)}
    assert lines[hanging]["status"] is None and lines[other]["status"] == 200
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.rst_received == {"cancel": 1}


async def test_a_broken_backend_gets_its_stream_a_502_or_a_reset(h2_balancer, h2_client) -> None:
    port, recorder, _, _ = await h2_balancer()
    client = await h2_client(port)
    cut = client.request("/die/5000")  # 100 bytes of a 5,000-byte body, then FIN
    await in_thread(client)
    assert client.answers[cut].status == 200 and client.answers[cut].reset == 2  # INTERNAL_ERROR
    assert not client.answers[cut].ended  # never passed off as whole
    assert len(client.answers[cut].body) == 100  # what came went on as it came
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.rst_sent == {"internal_error": 1}
    port, _, _, _ = await h2_balancer(backends=["127.0.0.1:1"])  # nothing listens
    client = await h2_client(port)
    refused = client.request("/")
    await in_thread(client)
    assert client.answers[refused].status == 502 and client.answers[refused].ended
    client.close()


async def test_our_own_answer_to_a_shut_window_is_its_status_alone(h2_balancer, h2_client) -> None:
    """A client whose window is shut (SETTINGS_INITIAL_WINDOW_SIZE 0) gets the balancer's 502
    as a HEADERS frame that ends the stream: no body that would not fit, nothing held."""
    port, _, _, _ = await h2_balancer(backends=["127.0.0.1:1"])  # nothing listens
    client = await h2_client(port)
    client.conn.update_settings({4: 0})
    refused = client.request("/")
    await in_thread(client, lambda: client.answers[refused].ended)
    answer = client.answers[refused]
    assert answer.status == 502 and answer.ended_with_headers and not answer.body
    after = client.request("/")  # (the connection goes on)
    await in_thread(client, lambda: client.answers[after].ended)
    assert client.answers[after].status == 502 and client.goaway is None
    client.close()


async def test_a_cut_streams_backend_connection_is_published_with_what_ended_it(
    h2_balancer, h2_client
) -> None:
    """A backend that closes (FIN) or resets (RST) mid-response: the stream is reset, and its
    backend connection still gets its line, saying which: the pool publishes it even when
    it was lost under the stream."""
    port, _, log, _ = await h2_balancer()
    client = await h2_client(port)
    closed, reset = client.request("/die/5000"), client.request("/reset")
    await in_thread(client)
    assert client.answers[closed].reset == client.answers[reset].reset == 2
    client.close()

    def causes() -> list[str]:
        lines = [json.loads(line) for line in log.getvalue().splitlines()]
        return sorted(x["close_cause"] for x in lines if x["type"] == "backend_connection")

    await until(lambda: len(causes()) == 2)
    assert causes() == ["backend_closed", "backend_reset"]


async def test_a_protocol_error_ends_the_connection_with_goaway(h2_balancer, h2_client) -> None:
    port, recorder, _, _ = await h2_balancer()
    client = await h2_client(port)
    # A DATA frame on stream 0 (RFC 9113 §6.1: a connection error of type PROTOCOL_ERROR).
    client.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    await in_thread(client, lambda: client.goaway is not None)
    assert client.goaway is not None and client.goaway.error_code == 1
    await in_thread(client, lambda: False)  # then the close
    assert client.closed
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "h2_error"
    assert record.h2 is not None and record.h2.goaway_first == "balancer"
    assert record.h2.goaway_sent == ("protocol_error", 0)


async def test_shutdown_sends_goaway_and_lets_the_stream_finish(
    h2_balancer, h2_client, certs, farm
) -> None:
    """curl's stream under way is answered whole; an idle client is told GOAWAY (NO_ERROR,
    the last stream it opened) and the connection closes."""
    port, recorder, _, balancer = await h2_balancer()
    idle = await h2_client(port)
    first = idle.request("/")
    await in_thread(idle)
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2", "--cacert", str(certs.ca), "-w", "\n%{http_code}",
        "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/delay/400",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await until(lambda: seen(farm, "/delay/400"))
    stopping = asyncio.create_task(balancer.shutdown(grace=5.0))
    # RFC 9113 §6.8's graceful close: a GOAWAY naming the highest stream id and a PING, and
    # once the PING is answered, the GOAWAY naming the last stream taken.
    await in_thread(idle, lambda: len(idle.goaways) == 2)
    assert [(g.error_code, g.last_stream_id) for g in idle.goaways] == [(0, 2**31 - 1), (0, first)]
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert out.decode().endswith("delayed\n\n200")  # whole, after the GOAWAY
    idle.close()
    await asyncio.wait_for(stopping, 6)
    records = await recorder.wait_for(2)
    assert {record.close_cause for record in records} == {"shutdown"}
    said = [(r.h2.goaway_sent, r.h2.goaway_first) for r in records if r.h2 is not None]
    assert (("no_error", first), "balancer") in said  # the idle client's connection


async def test_http11_clients_still_get_http11_on_the_same_listener(h2_balancer, certs) -> None:
    port, recorder, _, _ = await h2_balancer()
    context = client_context(certs.ca)
    context.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()
    (record,) = await recorder.wait_for(1)
    assert record.tls_alpn == "http/1.1"


async def test_h2_is_offered_by_default_and_off_where_configured(farm, certs) -> None:
    """A TLS http listener offers h2 first unless told; with `alpn = ["http/1.1"]` a client
    asking for h2 gets HTTP/1.1."""

    def listener(**extra: Any) -> Any:
        return parse_config(
            {
                "listeners": [{"name": "https", "bind": "127.0.0.1:0", "tls": True, **extra}],
                "backends": [{"address": farm[0].address}],
                "tls": {"cert": str(certs.cert), "key": str(certs.key)},
            },
            "test",
        )

    assert listener().listeners[0].alpn == ("h2", "http/1.1")
    table_plain = listener(alpn=["http/1.1"])
    assert table_plain.listeners[0].alpn == ("http/1.1",)
    balancer, _ = await start_balancer(table_plain)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port_of(balancer), ssl=context, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
    finally:
        await balancer.shutdown(grace=1.0)


@pytest.mark.parametrize(
    ("listener", "fix"),
    [
        ({"bind": "127.0.0.1:0", "alpn": ["h2"]}, "tls = true"),
        ({"bind": "127.0.0.1:0", "tls": True, "mode": "tcp", "alpn": ["h2"]}, "mode 'http'"),
        ({"bind": "127.0.0.1:0", "tls": True, "alpn": []}, "at least one"),
        ({"bind": "127.0.0.1:0", "tls": True, "alpn": ["h3"]}, "'h2' and 'http/1.1'"),
    ],
)
def test_a_bad_alpn_names_the_key_and_the_fix(listener: dict[str, Any], fix: str) -> None:
    table = {"listeners": [listener], "backends": [{"address": "127.0.0.1:9"}], "tls": {}}
    with pytest.raises(ConfigError) as error:
        parse_config(table, "test.toml")
    assert "listeners[0].alpn" in str(error.value) and fix in str(error.value)


async def six_one_after_another(client: H2Client, log: io.StringIO, backend: Any) -> list[Any]:
    """Six streams, each opened once the one before ended: one backend connection carries
    them all (the first new, the rest reused). Returns their request lines."""
    for _ in range(6):
        stream = client.request("/one-by-one")
        await in_thread(client, lambda stream=stream: client.answers[stream].ended)
    assert backend.connections == 1
    lines = request_lines(log)
    assert [line["reused"] for line in lines] == [False] + [True] * 5
    return lines


async def test_streams_take_idle_backend_connections_under_reuse_always(
    h2_balancer, h2_client, farm
) -> None:
    """Reuse always: a stream takes an idle backend connection when one waits, as an
    HTTP/1.1 request would; one after another, six streams need one connection."""
    port, _, log, _ = await h2_balancer(backends=[farm[0].address], upstream={"reuse": "always"})
    client = await h2_client(port)
    lines = await six_one_after_another(client, log, farm[0])
    assert len({line["backend_connection_id"] for line in lines}) == 1


async def test_head_and_trailers_cross_http2_both_ways(h2_balancer, h2_client, farm) -> None:
    """A HEAD's response ends at its head (its Content-Length kept, no body) and its backend
    connection serves the next stream; a response's trailers reach the client as its last
    HEADERS frame; a request's trailers reach the backend after its chunked body."""
    port, _, log, _ = await h2_balancer(backends=[farm[0].address], upstream={"reuse": "always"})
    client = await h2_client(port)
    head = client.request("/page", method="HEAD")
    await in_thread(client, lambda: client.answers[head].ended)
    trailed = client.request("/trailers")
    await in_thread(client, lambda: client.answers[trailed].ended)
    posted = client.request(
        "/upload", method="POST", body=b"hello", length=False, trailers=[("x-sum", "1")]
    )
    await in_thread(client, lambda: client.answers[posted].ended)
    answers = client.answers
    assert answers[head].status == 200 and answers[head].body == b""
    assert answers[head].ended_with_headers  # (END_STREAM on HEADERS: no empty DATA frame)
    assert not answers[trailed].ended_with_headers
    length = len(f"{farm[0].name} HEAD /page\n")  # (the GET's would be GET's words)
    assert answers[head].headers[b"content-length"] == b"%d" % length
    assert bytes(answers[trailed].body) == b"hello"
    assert answers[trailed].trailers == {b"x-checksum": b"abc"}
    assert answers[posted].status == 200 and bytes(answers[posted].body) == b"hello"
    upload = farm[0].seen[-1]
    assert ("x-sum", "1") in upload.headers and ("transfer-encoding", "chunked") in [
        (name.lower(), value) for name, value in upload.headers
    ]
    assert farm[0].connections == 1  # (each stream's connection clean, taken by the next)
    assert [line["reused"] for line in request_lines(log)] == [False, True, True]
    client.close()


async def test_under_reuse_never_a_connection_keeps_its_backend_connections_for_itself(
    h2_balancer, h2_client, farm
) -> None:
    """Reuse never, as HAProxy's: a backend connection is this client connection's alone;
    its next stream to the group takes it (one after another, six streams, one backend
    connection), and it closes when the client leaves. Streams at once get their own."""
    port, _, log, _ = await h2_balancer(backends=[farm[0].address])
    client = await h2_client(port)
    await six_one_after_another(client, log, farm[0])
    other = await h2_client(port)  # another client connection: a backend connection of its own
    another = other.request("/another")
    await in_thread(other)
    assert other.answers[another].status == 200 and farm[0].connections == 2
    slow = [client.request("/delay/200") for _ in range(3)]  # at once: one taken, two new
    await in_thread(client, lambda: all(client.answers[s].ended for s in slow))
    assert farm[0].connections == 4
    client.close()
    other.close()
    await until(lambda: not farm[0].open_connections)  # closed with their client connections


async def test_h2c_with_prior_knowledge_on_a_plain_listener(farm) -> None:
    """`h2c = true`: curl --http2-prior-knowledge speaks HTTP/2 over plain TCP; an HTTP/1.1
    client on the same listener is served as before."""
    config = parse_config(
        {
            "listeners": [{"name": "http", "bind": "127.0.0.1:0", "h2c": True}],
            "backends": [{"address": farm[0].address}],
        },
        "test",
    )
    balancer, recorder = await start_balancer(config)
    try:
        port = port_of(balancer)
        for flag, version in (("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")):
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", flag, "-w", "\n%{http_version}", f"http://127.0.0.1:{port}/x",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
            assert out.decode().endswith(f"GET /x\n\n{version}")
        protos = {seen.header("x-forwarded-proto") for seen in farm[0].seen}
        assert protos == {"http"}  # (plain TCP, HTTP/2 or not)
        h2, http1 = await recorder.wait_for(2)
        assert h2.h2 is not None and h2.h2.streams == 1 and h2.tls_alpn is None
        assert http1.h2 is None and http1.requests == 1
    finally:
        await balancer.shutdown(grace=1.0)


def test_h2c_is_for_plain_http_listeners() -> None:
    table = {
        "listeners": [{"bind": "127.0.0.1:0", "tls": True, "h2c": True}],
        "backends": [{"address": "127.0.0.1:9"}],
        "tls": {},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(table, "test.toml")
    assert "listeners[0].h2c" in str(error.value) and "alpn" in str(error.value)


async def test_nghttp_shows_the_frames_and_the_record_says_them(h2_balancer) -> None:
    """nghttp (nghttp2's client) prints every frame: two streams on one connection, then its
    GOAWAY; the record says the streams and that the client's GOAWAY came first."""
    nghttp = shutil.which("nghttp")
    if nghttp is None:
        pytest.skip("nghttp is not installed (.ci/run installs nghttp2-client)")
    port, recorder, _, _ = await h2_balancer()
    base = f"https://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        nghttp, "-nv", f"{base}/a", f"{base}/b", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    frames = out.decode()
    assert proc.returncode == 0, frames
    answered = re.findall(r"recv \(stream_id=(\d+)\) :status: 200", frames)
    assert len(answered) == 2  # (its streams are 13 and 15: 3 to 11 anchor its priorities)
    assert "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100]" in frames  # ours
    assert "[SETTINGS_ENABLE_PUSH(0x02):0]" in frames
    # Each body's last DATA frame carries END_STREAM: no empty frame of its own after it.
    assert len(re.findall(r"recv DATA frame <length=[1-9]\d*, flags=0x01", frames)) == 2
    assert "recv DATA frame <length=0" not in frames
    assert (
        frames.rstrip()
        .splitlines()[-2]
        .endswith("send GOAWAY frame <length=8, flags=0x00, stream_id=0>")
    )
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.streams == 2
    assert record.h2.goaway_first == "peer" and record.h2.goaway_received == ("no_error", 0)


async def test_chromium_loads_a_page_of_many_images_over_one_h2_connection(
    h2_balancer, farm
) -> None:
    chromium = next(
        (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
    )
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    port, recorder, _, _ = await h2_balancer()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors"]
    proc = await asyncio.create_subprocess_exec(
        chromium, *flags, "--dump-dom", f"https://127.0.0.1:{port}/page/30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert out.decode().count("<img") == 30
    images = {seen.path for backend in farm for seen in backend.seen if "/img/" in seen.path}
    assert images == {f"/img/{n}.png" for n in range(30)}
    records = await recorder.wait_for(1, timeout=10)
    page = [r for r in records if r.h2 is not None and r.h2.streams >= 31]
    assert len(page) == 1 and page[0].tls_alpn == "h2"  # the page and its images: one connection
    assert page[0].h2 is not None and page[0].h2.max_concurrent_streams > 1


# ---- the known attacks, refused ------------------------------------------------------------
# Each sends the attack on one connection and asserts the connection ended with the GOAWAY
# that names it, that the work it bought stayed bounded (backend connections, CPU of this
# thread, where the balancer runs), and that the balancer serves the next client.

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
           (b":authority", b"localhost")]  # fmt: skip


async def attacked(
    h2_balancer: Any, h2_client: Any, farm: Any, attack: Any, **extra: Any
) -> tuple[H2Client, float, int]:
    """Run `attack(client)` in a thread; read until the connection ends. Returns the client,
    this thread's CPU seconds meanwhile, and the backend connections made."""
    import time

    port, _, _, _ = await h2_balancer(**extra)
    client = await h2_client(port)
    before_cpu, before_conns = time.thread_time(), sum(b.connections for b in farm)
    await asyncio.to_thread(attack, client)
    await in_thread(client, lambda: False)  # until the server closes
    cpu = time.thread_time() - before_cpu
    assert client.closed
    # The next client is served.
    after = await h2_client(port)
    stream = after.request("/")
    await in_thread(after)
    assert after.answers[stream].status == 200
    return client, cpu, sum(b.connections for b in farm) - before_conns - 1


async def test_rapid_reset_is_refused_with_enhance_your_calm(h2_balancer, h2_client, farm) -> None:
    def attack(client: H2Client) -> None:
        conn = client.conn
        for _ in range(5000):  # CVE-2023-44487: open, reset, at once, without end
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, REQUEST, end_stream=True)
            conn.reset_stream(stream, 8)
        with contextlib.suppress(OSError):  # (the server hung up before it was all sent)
            client.flush()

    client, cpu, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None and client.goaway.error_code == 11  # ENHANCE_YOUR_CALM
    # It acted on no stream past its budget, and GOAWAY says which was the last it took.
    assert client.goaway.last_stream_id < 2 * 250
    assert connections < 250 and cpu < 2.0


@pytest.mark.parametrize("frame", ["ping", "settings", "empty_data", "tiny_window"])
async def test_control_frame_floods_are_refused(h2_balancer, h2_client, farm, frame) -> None:
    from hyperframe.frame import DataFrame, PingFrame, SettingsFrame, WindowUpdateFrame

    def attack(client: H2Client) -> None:
        stream = client.conn.get_next_available_stream_id()  # a POST kept open
        client.conn.send_headers(stream, [(b":method", b"POST"), *REQUEST[1:]])
        client.flush()
        flood = {
            "ping": lambda n: PingFrame(0, opaque_data=n.to_bytes(8, "big")),
            "settings": lambda n: SettingsFrame(0, settings={4: 65535}),
            "empty_data": lambda n: DataFrame(stream, b""),
            "tiny_window": lambda n: WindowUpdateFrame(stream, window_increment=1),
        }[frame]
        with contextlib.suppress(OSError):
            client.send_raw(b"".join(flood(n).serialize() for n in range(3000)))

    client, cpu, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None and client.goaway.error_code == 11
    assert connections <= 1 and cpu < 2.0


async def test_a_continuation_flood_is_refused(h2_balancer, h2_client, farm) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames without end (CVE-2024-27316's
    family): h2 holds at most 64 of them before it gives up the connection."""
    import hpack
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    def attack(client: H2Client) -> None:
        block = hpack.Encoder().encode(REQUEST)
        frames = [HeadersFrame(1, block).serialize()]
        frames += [ContinuationFrame(1, b"\x40\x01a\x01b").serialize() for _ in range(5000)]
        with contextlib.suppress(OSError):
            client.send_raw(b"".join(frames))

    client, cpu, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None and client.goaway.error_code in (1, 11)
    assert connections == 0 and cpu < 2.0


async def test_an_hpack_bomb_is_refused(h2_balancer, h2_client, farm) -> None:
    """One 4 KB dynamic-table entry referenced 3,000 times: 12 MB of headers from 7 KB."""
    import hpack
    from hyperframe.frame import HeadersFrame

    def attack(client: H2Client) -> None:
        block = hpack.Encoder().encode([*REQUEST, (b"x-bomb", b"a" * 4000)])
        block += b"\xbe" * 3000  # indexed: the dynamic table's first entry (62), again
        frame = HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"])
        client.send_raw(frame.serialize())

    client, cpu, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None and client.goaway.error_code in (9, 11)
    assert connections == 0 and cpu < 2.0


async def test_an_oversized_header_list_is_refused(h2_balancer, h2_client, farm) -> None:
    def attack(client: H2Client) -> None:
        client.request("/", headers=[("x-big", "b" * 100_000)])

    client, _, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None and client.goaway.error_code in (9, 11)
    assert connections == 0


MALFORMED = {
    # Connection-specific fields (RFC 9113 §8.2.2): WebSocket stays on HTTP/1.1.
    "upgrade": ("/", [("upgrade", "websocket")]),
    "connection": ("/", [("connection", "keep-alive")]),
    "transfer-encoding": ("/", [("transfer-encoding", "chunked")]),
    "te": ("/", [("te", "gzip")]),
    "uppercase name": ("/", [("X-Up", "1")]),
    "CR in a value": ("/", [("x-a", "a\rb")]),
    "edge whitespace": ("/", [("x-a", " a")]),
    "unknown pseudo-field": ("/", [(":protocol", "websocket")]),
    "host not the authority": ("/", [("host", "elsewhere")]),
    "space in :path": ("/a b", []),
    "empty :path": ("", []),
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_request_resets_its_stream_only(
    h2_balancer, h2_client, farm, case
) -> None:
    """A malformed request (RFC 9113 §8.1.1) is a stream error: RST_STREAM PROTOCOL_ERROR,
    never forwarded, and the connection serves its next request."""
    path, fields = MALFORMED[case]
    port, recorder, _, _ = await h2_balancer()
    client = await h2_client(port)
    client.conn.config.validate_outbound_headers = False  # (the client's h2 would refuse)
    client.conn.config.normalize_outbound_headers = False
    before = sum(b.connections for b in farm)
    bad = client.request(path, headers=fields)
    await in_thread(client)
    good = client.request("/")
    await in_thread(client)
    assert client.answers[bad].reset == 1 and client.answers[bad].status is None
    assert client.answers[good].status == 200 and client.goaway is None
    assert sum(b.connections for b in farm) - before == 1  # the good one's alone
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.rst_sent == {"protocol_error": 1}
    assert record.requests == 1


async def test_a_stream_error_of_the_clients_resets_that_stream_alone(
    h2_balancer, h2_client, farm
) -> None:
    """Trailers without END_STREAM (RFC 9113 §8.1) on a request its backend is answering:
    that stream is reset (PROTOCOL_ERROR), its backend connection closed, the reset counted
    in the record; the connection serves its next request."""
    from hyperframe.frame import HeadersFrame

    port, recorder, _, _ = await h2_balancer()
    client = await h2_client(port)
    stream = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream, [(b":method", b"POST"), (b":path", b"/slow"), *REQUEST[2:]])
    client.answers[stream] = Answer()
    client.flush()
    await until(lambda: seen(farm, "/slow"))
    open_before = sum(len(b.open_connections) for b in farm)
    block = client.conn.encoder.encode([(b"x-sum", b"1")])  # (the client's HPACK state kept)
    client.send_raw(HeadersFrame(stream, block, flags=["END_HEADERS"]).serialize())
    await in_thread(client, lambda: client.answers[stream].reset is not None)
    assert client.answers[stream].reset == 1 and client.answers[stream].status is None
    await until(lambda: sum(len(b.open_connections) for b in farm) == open_before - 1)
    after = client.request("/")
    await in_thread(client, lambda: client.answers[after].ended)
    assert client.answers[after].status == 200 and client.goaway is None
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.rst_sent == {"protocol_error": 1}


async def test_streams_past_the_limit_are_refused_alone(h2_balancer, h2_client, farm) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS is 100: a stream opened past it (here: sent before
    the client read our SETTINGS) is refused alone, RST_STREAM REFUSED_STREAM (RFC 9113
    §5.1.2, as nginx and HAProxy), never forwarded; the connection goes on."""
    port, recorder, _, _ = await h2_balancer()
    client = await h2_client(port)
    before = sum(b.connections for b in farm)
    streams = [client.request("/slow") for _ in range(150)]

    def refused() -> list[int]:
        return [stream for stream in streams if client.answers[stream].reset == 7]

    await in_thread(client, lambda: len(refused()) == 50)
    assert refused() == streams[100:]
    await until(lambda: sum(b.connections for b in farm) - before == 100)

    def cancel_the_rest() -> None:
        for stream in streams[:100]:
            client.reset(stream)

    await asyncio.to_thread(cancel_the_rest)
    after = client.request("/")
    await in_thread(client, lambda: client.answers[after].ended)
    assert client.answers[after].status == 200 and client.goaway is None
    assert sum(b.connections for b in farm) - before == 101  # (the refused: none)
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.h2 is not None and record.h2.rst_sent == {"refused_stream": 50}
    assert record.h2.max_concurrent_streams == 100 and record.h2.rst_received == {"cancel": 100}


@pytest.mark.parametrize("batches", [1, 20])
async def test_a_flood_past_the_stream_limit_ends_the_connection(
    h2_balancer, h2_client, farm, batches
) -> None:
    """A client that keeps opening streams past the limit is ended, as nginx ends one past
    twice its limit of refusals: in one read, at h2's backstop (PROTOCOL_ERROR, 200 streams
    at most made for it); over many reads, each refusal a glitch (ENHANCE_YOUR_CALM)."""

    def attack(client: H2Client) -> None:
        size = 400 // batches
        for batch in range(batches):
            # (a hostile client: it read our limit, and opens more all the same)
            client.conn.remote_settings[3] = 2**31 - 1  # SETTINGS_MAX_CONCURRENT_STREAMS
            client.conn.remote_settings.acknowledge()
            try:
                sent = [client.request("/slow") for _ in range(size)]
            except OSError:  # (the server hung up)
                return
            if batch >= 100 // size and batches > 1:  # past the limit: until refused
                client.read_until(lambda sent=sent: all(client.answers[s].reset for s in sent))
            if client.closed:
                return

    client, _, connections = await attacked(h2_balancer, h2_client, farm, attack)
    assert client.goaway is not None
    assert client.goaway.error_code == (1 if batches == 1 else 11)
    assert connections <= 100


async def test_a_window_shut_forever_ends_with_the_idle_timeout(
    h2_balancer, h2_client, farm
) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE 0 and no WINDOW_UPDATE: the response waits, its backend
    is no longer read, and the connection ends at keepalive_idle_seconds, the backend
    connection with it."""
    port, recorder, _, _ = await h2_balancer(timeouts={"keepalive_idle_seconds": 0.5})
    client = await h2_client(port)
    client.conn.update_settings({4: 0})
    stream = client.request("/size/2000000")
    await in_thread(client, lambda: False)
    assert client.closed and not client.answers[stream].body
    await until(lambda: not any(b.open_connections for b in farm))
    client.close()
    (record,) = await recorder.wait_for(1)
    assert record.close_cause == "idle_timeout"
