"""Publishing the facts: the Prometheus families (metrics.py), every log and record line's
format (loglines.py), the aggregation of workers, the status page and the admin API."""
