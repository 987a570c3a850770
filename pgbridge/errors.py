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
    """A client message could not be served. The message is the client-facing error text.

    ``forbidden`` marks a refusal of the token's grant (HTTP 403 on an SSE stream), rather than of the
    request itself (400).
    """

    def __init__(
        self, text: str, *, action: str | None = None, collection: str | None = None, forbidden: bool = False
    ) -> None:
        super().__init__(text)
        self.text = text
        self.action = action
        self.collection = collection
        self.forbidden = forbidden


class SchemaError(PgBridgeError):
    """The database's pgbridge schema is missing, older or newer than this bridge can use."""


class DatabaseUnavailable(PgBridgeError):
    """PostgreSQL could not be reached or did not answer; the operation may be retried."""


class ConnectionLost(DatabaseUnavailable):
    """The listener's connection ended or stopped answering."""


class PoolerError(PgBridgeError):
    """The listener's connection does not receive notifications: it goes through a pooler in transaction
    (or statement) mode, where LISTEN never works. An operator's error, like a schema error."""


class Pruned(PgBridgeError):
    """The position to resume from is no longer in the change log (retention removed it)."""


class DecodeError(PgBridgeError):
    """A change-log entry did not have the shape the triggers write."""


class ClientError(PgBridgeError):
    """:mod:`pgbridge.client` cannot go on: retrying would not help. The message says why."""


class TokenRefused(ClientError):
    """The server refused the client's token, and no token from ``get_token`` was accepted either.

    ``reason`` is the server's text: a close reason (``Authentication failed``, ``Token expired``, ...) or
    a refused refresh's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SubscriptionRefused(ClientError):
    """The server refused a subscription (a collection not allowed, a malformed filter, ...), or ended it
    (a refreshed token no longer allows it). ``text`` is the server's error text."""

    def __init__(self, text: str, collection: str) -> None:
        super().__init__(f"{collection}: {text}")
        self.text = text
        self.collection = collection
