"""Metrics, traces and request logs, as the runbook expects them."""
