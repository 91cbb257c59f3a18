"""`python -m balancer` is the `balancer` command."""

from balancer.cli import main

raise SystemExit(main())
