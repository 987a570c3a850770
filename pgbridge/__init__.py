"""pgbridge: push every change of published PostgreSQL tables to WebSocket clients."""

from pgbridge.errors import PgBridgeError

__all__ = ["PgBridgeError", "__version__"]
__version__ = "0.1.0"
