"""One client connection: the session and its parts (prelude, TLS front, HTTP flow,
tunnel, forwarder), the contract they see the session through, the listener that owns the
sessions, and drains."""
