"""Settings: every option of every command comes from one place, with one precedence.

An option ``--max-frame`` is also the variable ``PGBRIDGE_MAX_FRAME``: the flag wins over the variable,
which wins over the default. The database is the exception to the naming only: ``--dsn``, else
``DATABASE_URL`` (the name other tools use), else libpq's ``PG*`` variables.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pgbridge.errors import ConfigError

MIN_SECRET_BYTES = 32
"""HS256 keys shorter than the hash (RFC 7518, section 3.2) are refused."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What ``pgbridge serve`` runs with."""

    dsn: str | None = None
    """libpq connection string or URL; None means libpq's PG* variables."""
    listen_dsn: str | None = None
    """The listener's own connection, which LISTENs; None means :attr:`dsn`."""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    relay_port: int = 0
    advertise_host: str | None = None
    follow_only: bool = False
    jwt_secret: str | None = None
    jwt_secret_file: Path | None = None
    jwt_public_key: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 0.0
    unscoped_tokens: Literal["all", "none"] = "none"
    subjectless_tokens: Literal["refuse", "per-token"] = "refuse"
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
    max_snapshots: int = 2
    routing_budget: int = 50_000
    history_bytes: int = 32 * 1024 * 1024
    retention_age: float = 24 * 3600.0
    retention_transactions: int = 1_000_000
    prune_interval: float = 60.0
    probe_interval: float = 5.0
    probe_timeout: float = 5.0
    poll_interval: float = 0.01
    stats_interval: float = 10.0
    queue_warning: float = 0.5
    metrics_token: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    sse_retry: float = 2.0
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"

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
        if self.subjectless_tokens not in ("refuse", "per-token"):
            raise ConfigError("--subjectless-tokens must be refuse or per-token")
        if self.loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError("--loop must be auto, asyncio or uvloop")
        if not self.cors_origins:
            raise ConfigError("--cors-origins needs at least one origin, or * for any")
        if not -1 <= self.relay_port <= 65535:
            raise ConfigError("--relay-port must be a TCP port, 0 for any free one, or -1 for no relay")
        if self.workers > 1 and self.relay_port > 0:
            raise ConfigError(
                "--relay-port with --workers: each worker relays on a port of its own; use 0 (any free port)"
            )
        if self.follow_only and self.relay_port > 0:
            raise ConfigError("--relay-port with --follow-only: a bridge that never ticks relays nothing; drop one")
        check_secret(self.jwt_secret)


_POSITIVE = (
    "workers", "heartbeat", "handshake_timeout", "max_subscriptions", "max_frame", "outbound_limit", "stall_timeout",
    "close_timeout", "max_connections_per_subject", "max_filter_cost", "max_filter_cost_per_subject", "max_replays",
    "max_snapshots", "routing_budget", "history_bytes", "retention_age", "retention_transactions", "prune_interval",
    "probe_interval", "probe_timeout", "poll_interval", "stats_interval", "sse_retry",
)  # fmt: skip
_NOT_NEGATIVE = ("ping_interval", "idle_timeout", "max_connections", "jwt_leeway")


def check_secret(secret: str | None) -> None:
    """Refuse an HS256 secret with fewer than 32 bytes that are not whitespace."""
    if secret is not None and len("".join(secret.split()).encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the JWT secret is too short: HS256 needs at least {MIN_SECRET_BYTES} bytes that are not whitespace; "
            "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(text)
    return text


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: the flag ``--name``, the variable ``env`` (``PGBRIDGE_NAME``), a default."""

    name: str
    kind: Callable[[str], Any]
    default: Any
    help: str
    env: str = ""
    many: bool = False
    """A list: several values after the flag, or comma-separated in the variable."""

    @property
    def variable(self) -> str:
        return self.env or f"PGBRIDGE_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def _serve(name: str, kind: Callable[[str], Any], text: str) -> Option:
    return Option(name, kind, _DEFAULTS[name], text)


DSN = Option("dsn", str, None, "PostgreSQL URL or libpq string (else libpq's PG* variables)", env="DATABASE_URL")
LOGGING = (
    Option("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Option("log_format", log_format, "text", "text, or json: one object per line"),
)
SECRET = (
    Option("jwt_secret", str, None, f"HS256 secret client tokens are signed with (at least {MIN_SECRET_BYTES} bytes)"),
    Option("jwt_secret_file", Path, None, "file holding the HS256 secret (keeps it out of `ps` and the environment)"),
)
LISTEN_DSN = Option(
    "listen_dsn",
    str,
    None,
    "PostgreSQL URL or libpq string for the listener's own connection, which LISTENs: PostgreSQL itself or a "
    "session-mode pool, never a transaction-mode one (unset: the --dsn connection)",
)
SERVE = (
    DSN,
    LISTEN_DSN,
    _serve("host", str, "interface to listen on"),
    _serve("port", int, "TCP port"),
    _serve("workers", int, "processes sharing the port, each a whole bridge (SO_REUSEPORT)"),
    _serve(
        "relay_port",
        int,
        "TCP port, on --host, where this bridge relays the ticks it takes to the other bridges of the database "
        "(0: any free port; -1: none, so they read every tick from the database)",
    ),
    _serve(
        "follow_only",
        boolean,
        "never take the ticks, only follow the bridge that does: the listener's connection then need not LISTEN, "
        "so --listen-dsn may go through a transaction-mode pooler",
    ),
    _serve(
        "advertise_host",
        str,
        "host name or address the other bridges reach the relay at (unset: --host, or "
        "this machine's name when --host is a wildcard)",
    ),
    *(Option(o.name, o.kind, _DEFAULTS[o.name], o.help) for o in SECRET),
    _serve("jwt_public_key", Path, "PEM public key file: accept RS256 (RSA) or ES256 (P-256) tokens instead"),
    _serve("jwt_audience", str, "require this aud claim"),
    _serve("jwt_issuer", str, "require this iss claim"),
    _serve("jwt_leeway", float, "seconds of clock skew tolerated on exp/nbf"),
    _serve("unscoped_tokens", str, "what a token without a collections claim may subscribe to: all or none"),
    _serve(
        "subjectless_tokens",
        str,
        "a token without a non-empty sub claim: refuse it, or accept it as a subject of its own (per-token)",
    ),
    _serve("tenant_claim", str, "token claim holding the tenant (enables tenant isolation)"),
    _serve("tenant_column", str, "row column compared with the tenant claim"),
    _serve("heartbeat", float, "seconds between heartbeat messages"),
    _serve(
        "ping_interval",
        float,
        "seconds between WebSocket pings; a client that shows no sign of life for a whole interval is closed "
        "(0: never ping)",
    ),
    _serve("handshake_timeout", float, "seconds a new connection has to complete its WebSocket upgrade"),
    _serve("idle_timeout", float, "close connections that have had no subscription for this many seconds (0: never)"),
    _serve("max_subscriptions", int, "subscriptions per connection"),
    _serve("max_frame", int, "largest client frame in bytes (larger ones close with 1009)"),
    _serve("outbound_limit", int, "bytes waiting for one client; past it, the client is fed from the change log"),
    _serve("stall_timeout", float, "seconds a client may take no data at all before it is closed (1013)"),
    _serve("close_timeout", float, "seconds a client has to take the close frame before it is cut off"),
    _serve("max_connections", int, "connections per process (0: what the open-file limit allows)"),
    _serve("max_connections_per_subject", int, "connections per token subject (sub claim) and process"),
    _serve("max_filter_cost", int, "filter conditions (each `in` value counts) per connection"),
    _serve("max_filter_cost_per_subject", int, "filter conditions per token subject and process"),
    _serve("max_replays", int, "change-log reads in flight for catching-up clients (more wait their turn)"),
    _serve("max_snapshots", int, "snapshots read at once, each one database transaction (more wait their turn)"),
    _serve(
        "routing_budget",
        int,
        "filter conditions evaluated per change before the subjects whose filters cost most are fed from the "
        "change log instead of live",
    ),
    _serve("history_bytes", int, "bytes of recent changes kept in memory for clients that fall a little behind"),
    _serve("retention_age", float, "seconds the change log keeps a transaction"),
    _serve("retention_transactions", int, "most transactions the change log keeps"),
    _serve("prune_interval", float, "seconds between prunings of the change log"),
    _serve("probe_interval", float, "seconds between liveness probes of the listener's connection"),
    _serve("probe_timeout", float, "seconds a database query may take before the connection is dropped"),
    _serve("poll_interval", float, "seconds between polls while some table is published with wake => false"),
    _serve("stats_interval", float, "seconds between reads of the change log's size and the NOTIFY queue"),
    _serve("queue_warning", float, "NOTIFY queue fill (0 to 1) from which /healthz reports degraded"),
    _serve("metrics_token", str, "bearer token /metrics requires (default: none, open to all)"),
    Option(
        "cors_origins",
        str,
        ["*"],
        "origins whose pages may read event streams and /client.js (*: any; tokens are not cookies, so no "
        "credentials are allowed)",
        many=True,
    ),
    _serve("sse_retry", float, "seconds an EventSource waits before it reconnects (the stream's retry: field)"),
    _serve("loop", str, "event loop: uvloop (the fast extra), asyncio, or auto: uvloop when installed"),
)
DEV = (*SERVE, Option("data_dir", Path, Path(".pgbridge"), "where the embedded database lives"))
TOKEN = (
    *SECRET,
    Option("sub", str, None, "the token's subject (required)"),
    Option("ttl", float, 3600.0, "lifetime in seconds"),
    Option("collections", str, "*", "comma-separated collections the token may see, or *"),
    Option("claim", str, [], "extra claims NAME=VALUE (numbers stay numbers)", many=True),
)
PUBLISH = (
    DSN,
    Option("exclude", str, [], "columns never sent to clients", many=True),
    Option("collection", str, None, "collection name (default: the table's name)"),
    Option("wake", boolean, True, "send a wake-up NOTIFY per statement; false: writers take no lock, the bridge polls"),
)
STATUS = (DSN, Option("url", str, "http://127.0.0.1:8000", "a running bridge, whose /healthz to show"))
COMMANDS: Mapping[str, tuple[Option, ...]] = {
    "serve": SERVE,
    "dev": DEV,
    "migrate": (
        DSN,
        Option("lock_timeout", float, 60.0, "seconds to wait while another session holds the migration lock"),
    ),
    "publish": PUBLISH,
    "unpublish": (DSN,),
    "token": TOKEN,
    "status": STATUS,
}


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add each option as a flag; its help names its variable and default."""
    for o in options:
        shown = "unset" if o.default in (None, []) else o.default
        parser.add_argument(
            o.flag,
            type=o.kind,
            nargs="+" if o.many else None,
            default=None,
            metavar=o.name.upper(),
            help=f"{o.help} (env {o.variable}; default {shown})",
        )


def resolve(
    args: argparse.Namespace, options: Iterable[Option], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Each option's value: the flag if given, else the variable if set and not empty, else the default."""
    values: dict[str, Any] = {}
    for o in options:
        value = getattr(args, o.name, None)
        if value is None and (raw := environ.get(o.variable, "")) != "":
            try:
                value = [o.kind(v.strip()) for v in raw.split(",") if v.strip()] if o.many else o.kind(raw)
            except ValueError:
                raise ConfigError(f"{o.variable}={raw!r} is not a valid {_expected(o.kind)}") from None
        values[o.name] = o.default if value is None else value
    return values


def _expected(kind: Callable[[str], Any]) -> str:
    if kind is boolean:
        return "boolean (true or false)"
    if kind is log_format:
        return "log format (text or json)"
    return str(getattr(kind, "__name__", "value"))


def read_secret(values: dict[str, Any]) -> str | None:
    """The HS256 secret, given directly or as a file (never both); checked for length."""
    secret, path = values.get("jwt_secret"), values.get("jwt_secret_file")
    if path is not None:
        if secret:
            raise ConfigError("give the JWT secret once: --jwt-secret or --jwt-secret-file, not both")
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the JWT secret file {path}: {exc.strerror}") from None
    check_secret(secret)
    return secret


def settings(values: dict[str, Any], **overrides: Any) -> Settings:
    """The serve settings from resolved option values (the secret read from its file if need be)."""
    chosen = {k: v for k, v in {**values, **overrides}.items() if k in _DEFAULTS}
    chosen["jwt_secret"] = read_secret(chosen)
    for name, default in _DEFAULTS.items():
        if isinstance(default, tuple) and name in chosen:
            chosen[name] = tuple(chosen[name])
    return Settings(**chosen)
