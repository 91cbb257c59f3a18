"""Trying it out: a local CA and certificates, a demo farm of HTTP backends, `balancer demo`."""
