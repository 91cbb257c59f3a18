"""The farm: backends and their state in this worker, the balancing policies, the pool (and
its shared table), one backend TCP connection and the connector, groups and routing, active
health checks, members from DNS."""
