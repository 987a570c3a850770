"""Settings: one frozen object, from command-line flags, ``PGBRIDGE_*`` variables and defaults.

Every setting has a flag (``--max-frame``) and a variable (``PGBRIDGE_MAX_FRAME``); a flag wins over
the variable, which wins over the default. The database is ``--dsn``, else ``DATABASE_URL``, else
libpq's ``PG*`` variables.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pgbridge.errors import ConfigError

MIN_SECRET_BYTES = 32
"""HS256 keys shorter than the hash (RFC 7518, section 3.2) are refused."""


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: str | None = None
    """libpq connection string or URL; None means libpq's PG* variables."""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    jwt_secret: str | None = None
    jwt_secret_file: Path | None = None
    jwt_public_key: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    unscoped_tokens: Literal["all", "none"] = "none"
    tenant_claim: str | None = None
    tenant_column: str | None = None
    heartbeat: float = 30.0
    ping_interval: float = 30.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    max_subscriptions: int = 100
    max_frame: int = 64 * 1024
    outbound_limit: int = 1024 * 1024
    stall_timeout: float = 30.0
    close_timeout: float = 5.0
    max_connections: int = 0
    max_connections_per_subject: int = 100
    max_filter_cost: int = 1000
    max_filter_cost_per_subject: int = 10_000
    max_replays: int = 4
    history_bytes: int = 32 * 1024 * 1024
    retention_age: float = 24 * 3600.0
    retention_transactions: int = 1_000_000
    prune_interval: float = 60.0
    probe_interval: float = 5.0
    probe_timeout: float = 5.0
    poll_interval: float = 0.01
    stats_interval: float = 10.0
    queue_warning: float = 0.5

    def __post_init__(self) -> None:
        if (self.tenant_claim is None) != (self.tenant_column is None):
            raise ConfigError("tenant isolation needs both --tenant-claim and --tenant-column")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be zero or positive")
        if self.unscoped_tokens not in ("all", "none"):
            raise ConfigError("--unscoped-tokens must be all or none")
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the JWT secret is too short: HS256 needs at least {MIN_SECRET_BYTES} bytes; generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )


_POSITIVE = (
    "workers", "heartbeat", "handshake_timeout", "max_subscriptions", "max_frame", "outbound_limit", "stall_timeout",
    "close_timeout", "max_connections_per_subject", "max_filter_cost", "max_filter_cost_per_subject", "max_replays",
    "history_bytes", "retention_age", "retention_transactions", "prune_interval", "probe_interval", "probe_timeout",
    "poll_interval", "stats_interval",
)  # fmt: skip
_NOT_NEGATIVE = ("ping_interval", "idle_timeout", "max_connections", "jwt_leeway")


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# flag name -> (type, help). Each also reads PGBRIDGE_<NAME> from the environment.
SERVE_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "host": (str, "interface to listen on"),
    "port": (int, "TCP port"),
    "workers": (int, "processes sharing the port, each a whole bridge (SO_REUSEPORT)"),
    "jwt_secret": (str, f"HS256 secret client tokens are signed with (at least {MIN_SECRET_BYTES} bytes)"),
    "jwt_secret_file": (Path, "file holding the HS256 secret (keeps it out of `ps` and the environment)"),
    "jwt_public_key": (Path, "PEM public key file: accept RS256 (RSA) or ES256 (P-256) tokens instead"),
    "jwt_audience": (str, "require this aud claim"),
    "jwt_issuer": (str, "require this iss claim"),
    "jwt_leeway": (float, "seconds of clock skew tolerated on exp/nbf"),
    "unscoped_tokens": (str, "what a token without a collections claim may subscribe to: all or none"),
    "tenant_claim": (str, "token claim holding the tenant (enables tenant isolation)"),
    "tenant_column": (str, "row column compared with the tenant claim"),
    "heartbeat": (float, "seconds between heartbeat messages"),
    "ping_interval": (
        float,
        "seconds between WebSocket pings; a client that does not answer within half of it is closed (0: never ping)",
    ),
    "handshake_timeout": (float, "seconds a new connection has to complete its WebSocket upgrade"),
    "idle_timeout": (float, "close connections that have had no subscription for this many seconds (0: never)"),
    "max_subscriptions": (int, "subscriptions per connection"),
    "max_frame": (int, "largest client frame in bytes (larger ones close with 1009)"),
    "outbound_limit": (int, "bytes queued for one client; past it, the client is fed from the change log"),
    "stall_timeout": (float, "seconds a client may take no data at all before it is closed (1013)"),
    "max_connections": (int, "connections per process (0: what the open-file limit allows)"),
    "max_connections_per_subject": (int, "connections per token subject (sub claim) and process"),
    "max_filter_cost": (int, "filter conditions (each `in` value counts) per connection"),
    "max_filter_cost_per_subject": (int, "filter conditions per token subject and process"),
    "max_replays": (int, "change-log reads in flight for catching-up clients (more wait their turn)"),
    "history_bytes": (int, "bytes of recent changes kept in memory for clients that fall a little behind"),
    "retention_age": (float, "seconds the change log keeps a transaction"),
    "retention_transactions": (int, "most transactions the change log keeps"),
    "probe_interval": (float, "seconds between liveness probes of the listener's connection"),
    "probe_timeout": (float, "seconds a database query may take before the connection is dropped"),
    "poll_interval": (float, "seconds between polls while some table is published with wake => false"),
}


def add_dsn_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL or libpq string (default: $DATABASE_URL, else libpq's PG* variables)",
    )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, (kind, text) in SERVE_FLAGS.items():
        env = f"PGBRIDGE_{name.upper()}"
        default = defaults[name]
        shown = "unset" if default is None else default
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{text} (env {env}; default {shown})",
        )


def from_environment(name: str, kind: Callable[[str], Any]) -> Any:
    """``PGBRIDGE_<NAME>`` converted to ``kind``, or None when unset or empty."""
    raw = os.environ.get(f"PGBRIDGE_{name.upper()}")
    if raw in (None, ""):
        return None
    try:
        return kind(raw)
    except ValueError:
        expected = "boolean" if kind is _boolean else getattr(kind, "__name__", "value")
        raise ConfigError(f"PGBRIDGE_{name.upper()}={raw!r} is not a valid {expected}") from None


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Flags win over ``PGBRIDGE_*`` variables, which win over the defaults."""
    values: dict[str, Any] = {"dsn": args.dsn}
    for name, (kind, _) in SERVE_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            value = from_environment(name, kind)
        if value is not None:
            values[name] = value
    values.update(overrides)
    secret_file = values.get("jwt_secret_file")
    if secret_file is not None:
        if values.get("jwt_secret"):
            raise ConfigError("give the JWT secret once: --jwt-secret or --jwt-secret-file, not both")
        try:
            values["jwt_secret"] = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the JWT secret file {secret_file}: {exc.strerror}") from None
    return Settings(**values)
