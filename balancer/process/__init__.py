"""The processes: the Balancer a worker runs (server.py builds every part), workers, the
supervisor (reload, generations, the shared tables), the control socket, systemd notify."""
