"""Settings: one frozen object, from command-line flags, ``PGBRIDGE_*`` variables and ``DATABASE_URL``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pgbridge.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: str | None = None
    """libpq connection string or URL; None means libpq's PG* variables."""
    host: str = "127.0.0.1"
    port: int = 8000
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    unscoped_tokens: Literal["all", "none"] = "none"
    tenant_claim: str | None = None
    tenant_column: str | None = None
    heartbeat: float = 30.0
    max_subscriptions: int = 100
    max_frame: int = 64 * 1024
    outbound_limit: int = 4 * 1024 * 1024
    close_timeout: float = 5.0
    retention_age: float = 24 * 3600.0
    retention_transactions: int = 1_000_000
    prune_interval: float = 60.0
    probe_interval: float = 5.0
    probe_timeout: float = 5.0
    stats_interval: float = 10.0
    queue_warning: float = 0.5
    verify_notifications: bool = False

    def __post_init__(self) -> None:
        if (self.tenant_claim is None) != (self.tenant_column is None):
            raise ConfigError("tenant isolation needs both --tenant-claim and --tenant-column")
        for name in (
            "heartbeat",
            "max_subscriptions",
            "max_frame",
            "outbound_limit",
            "retention_age",
            "retention_transactions",
            "prune_interval",
            "probe_interval",
            "probe_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# flag name -> (type, help). Each flag also reads PGBRIDGE_<NAME> from the environment.
_SERVE_FLAGS: dict[str, tuple[Any, str]] = {
    "host": (str, "interface to listen on"),
    "port": (int, "TCP port"),
    "jwt_secret": (str, "HS256 secret that client tokens are signed with"),
    "jwt_public_key": (Path, "PEM public key file: accept RS256 (RSA) or ES256 (P-256) tokens instead"),
    "jwt_audience": (str, "require this aud claim"),
    "jwt_issuer": (str, "require this iss claim"),
    "jwt_leeway": (float, "seconds of clock skew tolerated on exp/nbf"),
    "unscoped_tokens": (str, "what a token without a collections claim may subscribe to: all or none"),
    "tenant_claim": (str, "token claim holding the tenant (enables tenant isolation)"),
    "tenant_column": (str, "row column compared with the tenant claim"),
    "heartbeat": (float, "seconds between heartbeats"),
    "max_subscriptions": (int, "subscriptions per connection"),
    "max_frame": (int, "largest client frame in bytes (larger ones close with 1009)"),
    "outbound_limit": (int, "bytes queued for one client before it is closed as slow (1013)"),
    "retention_age": (float, "seconds the change log keeps a transaction"),
    "retention_transactions": (int, "most transactions the change log keeps"),
    "probe_interval": (float, "seconds between liveness probes of the listener's connection"),
    "probe_timeout": (float, "seconds a liveness probe may take before the connection is dropped"),
    "verify_notifications": (
        _boolean,
        "read every change back from the change log instead of trusting NOTIFY payloads (true/false)",
    ),
}


def add_dsn_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL or libpq string (default: $DATABASE_URL, else libpq's PG* variables)",
    )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, (kind, text) in _SERVE_FLAGS.items():
        env = f"PGBRIDGE_{name.upper()}"
        default = defaults[name]
        shown = "unset" if default is None else default
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"{text} (env {env}; default {shown})",
        )


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Flags win over ``PGBRIDGE_*`` variables, which win over the defaults."""
    values: dict[str, Any] = {"dsn": args.dsn}
    types = {name: kind for name, (kind, _) in _SERVE_FLAGS.items()}
    for name, kind in types.items():
        value = getattr(args, name, None)
        if value is None and (raw := os.environ.get(f"PGBRIDGE_{name.upper()}")) not in (None, ""):
            try:
                value = kind(raw)
            except ValueError:
                expected = "boolean" if kind is _boolean else kind.__name__
                raise ConfigError(f"PGBRIDGE_{name.upper()}={raw!r} is not a valid {expected}") from None
        if value is not None:
            values[name] = value
    values.update(overrides)
    if values.get("unscoped_tokens", "none") not in ("all", "none"):
        raise ConfigError("--unscoped-tokens must be all or none")
    return Settings(**values)
