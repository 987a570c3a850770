"""The aiohttp application: the realtime endpoints (WebSocket and SSE), health, metrics and pages.

The endpoints are transports (:mod:`pgbridge.websocket`, :mod:`pgbridge.sse`) around one session type;
what they share lives in :class:`~pgbridge.hub.Bridge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pgbridge import relay, sse, websocket
from pgbridge.auth import TokenPolicy, bearer_matches
from pgbridge.config import Settings
from pgbridge.hub import SIDE_TASKS, Bridge
from pgbridge.listener import Listener
from pgbridge.logs import OncePer
from pgbridge.metrics import CONTENT_TYPE, Exposition
from pgbridge.protocol import SHUTTING_DOWN, SSE_PATH, WS_PATH, Close
from pgbridge.stream import BRIDGE

log = logging.getLogger(__name__)

_RESERVED_FILES = 64  # descriptors kept for the database pool, health checks and the log


async def healthz(request: web.Request) -> web.Response:
    """200 while the listener is connected and caught up, 503 otherwise, with the figures to watch."""
    bridge = request.app[BRIDGE]
    listener = bridge.listener
    failed = {name: error for name, (error, when) in bridge.task_failures.items() if time.monotonic() - when < 300}
    crowded = listener.queue_usage >= bridge.settings.queue_warning
    uncaptured = len(bridge.capture_problems)
    reads_failing = bridge.catchup_failure is not None and time.monotonic() - bridge.catchup_failure[1] < 60
    degraded = failed or crowded or uncaptured or reads_failing
    body: dict[str, object] = {
        "status": "unavailable" if not listener.connected else "degraded" if degraded else "ok",
        "database": "connected" if listener.connected else "unavailable (the bridge's log says why)",
        "clients": len(bridge.sessions),
        "changes_delivered": listener.delivered,
        "ticker": listener.ticking,
        "relay": _relay_state(listener),
        "catching_up": len(bridge.feeds),
        "catch_up_lag_seconds": round(bridge.catch_up_lag(), 3),
        "catch_up_lag_events": bridge.catch_up_lag_events(),
        "catch_up_reads": bridge.catchup_reads,
        "catch_up_reads_per_second": bridge.catchup_rate.per_second(time.monotonic()),
        "catch_up_read_failures": bridge.catchup_failures,
    }  # fmt: skip
    if reads_failing and bridge.catchup_failure is not None:  # in the last minute: clients wait for it
        body["catch_up_read_error"] = f"{bridge.catchup_failure[0]} (retried; the bridge's log says more)"
    if bridge.feeds:
        body["furthest_behind"] = bridge.furthest_behind()
    body["notification_queue_usage"] = listener.queue_usage
    if crowded:
        body["notification_queue"] = (
            "past the warning level: writers send no wake-ups and the bridge polls; a session that LISTENs "
            "and stays in a transaction may be holding it (see pg_stat_activity)"
        )
    if bridge.stats is not None:
        body["changelog_transactions"] = bridge.stats.changelog_transactions
        body["changelog_bytes"] = bridge.stats.changelog_bytes
    if uncaptured:  # which ones is for `pgbridge status` and the log: this endpoint names no collection
        body["publications_not_captured"] = uncaptured
    if failed:
        body["failed_tasks"] = failed  # in the last five minutes
    return web.json_response(body, status=200 if listener.connected else 503)


def _relay_state(listener: Listener) -> str:
    """What the ticker relays, or how a follower gets the ticks' changes."""
    if listener.ticking:
        return "off (--relay-port -1)" if listener.relay is None else f"serving {listener.relay.followers} bridges"
    return "following the ticker's relay" if listener.link is not None else "reading the ticks from the database"


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: the bridge's figures in the Prometheus text format (behind ``--metrics-token``)."""
    bridge = request.app[BRIDGE]
    expected = bridge.settings.metrics_token
    if expected is not None and not bearer_matches(request.headers.get("Authorization", ""), expected):
        return web.json_response(
            {"error": "/metrics needs the header Authorization: Bearer <the --metrics-token value>"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    listener = bridge.listener
    per_collection: Counter[str] = Counter()
    for session in bridge.sessions:
        per_collection.update(bridge.router.subscriptions(session).keys())
    out = Exposition()
    out.gauge("up", "1 while the listener is connected to the database", int(listener.connected))
    out.gauge("connections", "open client connections", len(bridge.sessions))
    out.labelled("subscriptions", "gauge", "subscriptions, by collection", "collection", per_collection)
    out.counter("changes_received_total", "row changes read from the change log and routed", listener.delivered)
    out.counter("frames_sent_total", "WebSocket frames written to clients (events, replies, notices)",
                bridge.frames_sent)  # fmt: skip
    out.counter("bytes_sent_total", "bytes of WebSocket frames written to clients", bridge.bytes_sent)
    out.labelled("clients_closed_total", "counter", "connections the server closed or refused, by reason", "reason",
                 bridge.closed)  # fmt: skip
    out.counter("listener_reconnects_total", "times the listener reconnected to the database", listener.reconnects)
    out.gauge("ticker", "1 while this bridge takes the ticks (holds the ticker lease); the others follow it",
              int(listener.ticking))  # fmt: skip
    out.counter("ticker_takeovers_total", "times this bridge took the ticker lease", listener.takeovers)
    out.counter("log_reads_total", "reads of ticks' changes from the change log by the listener", listener.log_reads)
    out.counter("relayed_pages_total", "pages of changes this bridge got from the ticker's relay instead",
                listener.relayed_pages)  # fmt: skip
    out.gauge("relay_followers", "bridges following this one's relay (while it ticks)",
              0 if listener.relay is None else listener.relay.followers)  # fmt: skip
    out.counter("relay_dropped_total", f"followers this bridge's relay dropped for leaving {relay.BUFFER_LIMIT >> 20} "
                "MiB unread (they read the change log instead)",
                0 if listener.relay is None else listener.relay.dropped)  # fmt: skip
    out.counter("replays_total", "subscriptions that resumed with since", bridge.replays)
    out.counter("filter_conditions_evaluated_total", "row filter conditions evaluated to route changes live "
                "(subscriptions with equal filters share one evaluation)", bridge.router.evaluated)  # fmt: skip
    out.counter("routing_deferred_total", "subscriptions fed from the change log because their subject's filters "
                "went over --routing-budget", bridge.router.deferred)  # fmt: skip
    out.counter("catch_up_reads_total", "change-log reads for clients catching up", bridge.catchup_reads)
    out.counter("catch_up_read_failures_total", "change-log reads for clients catching up that failed (each is "
                "retried; the clients wait)", bridge.catchup_failures)  # fmt: skip
    out.gauge("catching_up", "subscriptions fed from the change log, behind the live stream", len(bridge.feeds))
    out.gauge("catch_up_lag_seconds", "how far behind the furthest catching-up client is", bridge.catch_up_lag())
    out.gauge("catch_up_lag_events", "row changes the furthest catching-up client has yet to get past",
              bridge.catch_up_lag_events())  # fmt: skip
    out.gauge("notification_queue_usage", "fill of the NOTIFY queue, 0 to 1 (past 0.5 writers send no wake-ups)",
              listener.queue_usage)  # fmt: skip
    if bridge.stats is not None:
        out.gauge("changelog_transactions", "transactions in the change log", bridge.stats.changelog_transactions)
        out.gauge("changelog_bytes", "size of the change log on disk", bridge.stats.changelog_bytes)
    broken = {name: int(name in bridge.capture_problems) for name in bridge.publications or ()}
    out.labelled("capture_broken", "gauge", "1 for a published table whose capture triggers are disabled or missing",
                 "collection", broken)  # fmt: skip
    out.labelled("task_failures_total", "counter", "failures of the bridge's side tasks (each is restarted)", "task",
                 {name: bridge.task_failure_count[name] for name in SIDE_TASKS})  # fmt: skip
    out.histogram("delivery_latency_seconds", "from a change's statement time in the database to its sending",
                  listener.latency)  # fmt: skip
    return web.Response(body=out.text().encode(), headers={"Content-Type": CONTENT_TYPE})


_PAGES = {  # the inspector: static files of this package, served from memory
    "/": ("index.html", "text/html"),
    "/inspector/inspector.js": ("inspector.js", "text/javascript"),
    "/inspector/inspector.css": ("inspector.css", "text/css"),
}
# The page renders untrusted row values: even if one slipped through as markup, nothing but the page's
# own files could run or load.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _page(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    name, content_type = _PAGES[path]
    body = resources.files("pgbridge").joinpath("static", name).read_bytes()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Content-Security-Policy": _PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                     "Cache-Control": "no-cache"},
        )  # fmt: skip

    return serve


def _descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit; return what connections may use."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(16, soft - _RESERVED_FILES)


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Report running out of descriptors once a minute instead of once per attempt; return how to undo it."""
    reported = OncePer(60)
    default = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            if reported():
                log.error("out of file descriptors: new connections wait (reported once a minute): %s",
                          context.get("exception"))  # fmt: skip
            return
        if default is not None:
            default(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(default)


def _client_module() -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /client.js``: the JavaScript client (``pgbridge/static/client``, also an npm package), served
    so that ``import { connect } from "http://<bridge>/client.js"`` works from a page of another origin."""
    body = resources.files("pgbridge").joinpath("static", "client", "client.js").read_bytes()

    async def serve(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                   **sse.cors_headers(request, request.app[BRIDGE].settings.cors_origins)}  # fmt: skip
        return web.Response(body=body, content_type="text/javascript", charset="utf-8", headers=headers)

    return serve


async def _background(app: web.Application) -> AsyncIterator[None]:
    restore = _quiet_accept_errors(asyncio.get_running_loop())
    try:
        async with app[BRIDGE].running():
            yield
    finally:
        restore()


async def _close_clients(app: web.Application) -> None:
    await app[BRIDGE].close_all(Close.GOING_AWAY, SHUTTING_DOWN)


class _ClientErrors(logging.Filter):
    """aiohttp logs a malformed or abandoned request at ERROR with a traceback: the client's doing, not
    the server's, and the request line may hold a token. Keep one line a minute, at DEBUG, without it."""

    def __init__(self) -> None:
        super().__init__()
        self._reported = OncePer(60)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError | ConnectionError):
            return True
        if self._reported():
            log.debug("a client sent a malformed request or left during it (%s; reported once a minute)",
                      type(error).__name__)  # fmt: skip
        return False


_client_errors = _ClientErrors()


def runner(app: web.Application) -> web.AppRunner:
    """How the bridge's application is served: no access log (request lines hold tokens), and connections
    that do not complete a request within ``--handshake-timeout`` are closed."""
    settings = app[BRIDGE].settings
    logging.getLogger("aiohttp.server").addFilter(_client_errors)
    return web.AppRunner(app, access_log=None, keepalive_timeout=settings.handshake_timeout, shutdown_timeout=5)


def create_app(settings: Settings, tokens: TokenPolicy) -> web.Application:
    """The bridge as an aiohttp application; its listener and tasks run while the app runs."""
    app = web.Application()
    limit = settings.max_connections or _descriptor_limit()
    app[BRIDGE] = Bridge(settings, tokens, limit)
    app.router.add_get(WS_PATH, websocket.handle)
    app.router.add_get(SSE_PATH, sse.handle)
    app.router.add_route("OPTIONS", SSE_PATH, sse.preflight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    for path in _PAGES:
        app.router.add_get(path, _page(path))
    app.router.add_get("/client.js", _client_module())
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_close_clients)
    return app
