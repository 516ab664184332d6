"""The grpc.aio service: wiring (`app`), the servicer, and the runtime it reads."""

from quorum_quest.server.app import LockServer, running_server, serve

__all__ = ["LockServer", "running_server", "serve"]
