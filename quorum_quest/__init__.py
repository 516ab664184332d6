"""Quorum Quest: leases on named locks, served over gRPC."""
