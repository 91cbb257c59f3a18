"""Coverage-guided fuzzing of the HTTP seam with atheris (not run in CI; see README).

    pip install atheris
    python tests/fuzz/fuzz_http1.py -max_total_time=600

Any input must leave RequestReader with at most a typed ClientError, and ResponseFramer with at
most BadBackendResponse; an accepted request must parse again the same way.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from balancer.wire.errors import BadBackendResponse, ClientError
    from balancer.wire.http1 import HeadLimits, RequestReader, ResponseFramer


def one_input(data: bytes) -> None:
    split = data[0] if data else 0
    body = data[1:]
    reader = RequestReader("192.0.2.1", "http", 80, HeadLimits(max_header_bytes=4096))
    out = reader.feed(body[:split]) + reader.feed(body[split:])
    assert reader.error is None or isinstance(reader.error, ClientError)
    if reader.error is None and reader.messages_completed:
        again = RequestReader("192.0.2.1", "http", 80, HeadLimits(max_header_bytes=1 << 20))
        again.feed(out)
        assert again.error is None, (body, out, again.error)
        assert again.messages_completed >= reader.messages_completed
    framer = ResponseFramer()
    framer.expect(split % 2 == 0)
    try:
        relayed = framer.feed(body[:split]) + framer.feed(body[split:])
    except BadBackendResponse:
        return
    assert body.startswith(relayed)  # never invents bytes; holds back at most a partial head


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
