"""Sockets and TCP: accepting, one Leg per TCP connection side (its own teardown facts),
TCP_INFO, TLS contexts, write batching, and the deadline wheel every connection's timeouts
ride on."""
