"""Prometheus exposition endpoint."""
