"""The exceptions pgbridge raises. Everything derives from :class:`PgBridgeError`."""


class PgBridgeError(Exception):
    """Root of every error pgbridge raises on purpose."""


class ConfigError(PgBridgeError):
    """A setting is missing or invalid; the message says which and how to set it."""


class MigrationError(PgBridgeError):
    """A migration could not be applied."""


class AuthError(PgBridgeError):
    """A token was refused. ``reason`` is the WebSocket close reason sent to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolError(PgBridgeError):
    """A client message could not be served. The message is the client-facing error text."""

    def __init__(self, text: str, *, action: str | None = None, collection: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.action = action
        self.collection = collection


class SchemaError(PgBridgeError):
    """The database's pgbridge schema is missing, older or newer than this bridge can use."""


class DatabaseUnavailable(PgBridgeError):
    """PostgreSQL could not be reached or did not answer; the operation may be retried."""
