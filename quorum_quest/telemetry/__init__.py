"""Logging (and, later, tracing and metrics) set-up for the service."""
