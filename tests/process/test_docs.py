"""``docs/`` and the README: every code block is run against a real bridge, and the reference matches
the code.

Blocks are fenced with a language and, where running them needs more than running them, a role:
``sh`` runs in bash (``sh server`` starts a server and stops it once healthy, ``sh install`` installs
into a temporary directory, ``sh env-file`` is a systemd environment file, ``sh interactive`` is a
WebSocket client typed into), ``sql`` runs in psql, ``json`` must parse (client messages must be valid
ones), ``ini`` is the systemd unit (its command runs with the environment file), ``haproxy`` runs as a
TLS proxy in front of a bridge, and ``javascript client`` / ``html client`` / ``python client`` run in
Chromium (a classic script of a ``file://`` page / a page served from another origin than the bridge's)
/ Python and must print ``subscribed to posts``, then the row inserted meanwhile as ``posts.create {…}``.
The address ``127.0.0.1:8000`` and the tokens ``YOUR_TOKEN`` and ``PASTE_TOKEN`` are replaced by the
test bridge's.

Two kinds are checked but not run, because they need what a test cannot give them: ``sh make`` (the
Makefile's targets, which set up ``.venv``, serve until stopped or run this suite: each must be one of
the Makefile's) and ``sh own-database`` (the reader's own database and secret: each ``pgbridge`` command
must parse and each exported variable be one pgbridge reads). ``text`` is a figure or what a program
prints, and is not run.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shlex
import signal
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import pytest
import websockets
from aiohttp import web

from pgbridge import config, protocol
from pgbridge.cli import _parser
from tests.browser.chromium import Browser, needs_chromium
from tests.helpers import SECRET, Cluster, RunningBridge, free_port, healthy, token, wait_for
from tests.process.haproxy import HAPROXY, needs_haproxy

if TYPE_CHECKING:
    from tests.conftest import Bridges

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```(\S*)[ \t]*(\S*)\n(.*?)^\1```", re.M | re.S)  # also in a list item, indented
KNOWN = {("sh", ""), ("sh", "server"), ("sh", "install"), ("sh", "env-file"), ("sh", "interactive"), ("sh", "make"),
         ("sh", "own-database"), ("sql", ""), ("json", ""), ("ini", ""), ("haproxy", ""), ("javascript", "client"),
         ("html", "client"), ("python", "client"), ("text", ""), ("ini", "pgbouncer")}  # fmt: skip
VARIABLES = {o.variable for options in (config.LOGGING, *config.COMMANDS.values()) for o in options}
TOKENS = ("YOUR_TOKEN", "PASTE_TOKEN")


@dataclass(frozen=True)
class Block:
    page: str
    lang: str
    role: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang} {self.role})".replace(" )", ")")


def blocks(page: str) -> list[Block]:
    """The code blocks of ``page`` (a path from the repository's root), each without its indentation."""
    text = (ROOT / page).read_text()
    found = []
    for m in FENCE.finditer(text):
        indent, body = m[1], m[4]
        lines = body.splitlines(keepends=True)
        assert all(line.startswith(indent) or not line.strip() for line in lines), f"{page}: a block's indentation"
        body = "".join(line.removeprefix(indent) for line in lines)
        found.append(Block(page, m[2], m[3], body, text.count("\n", 0, m.start()) + 1))
    return found


def test_every_block_is_one_the_tests_run() -> None:
    found = [b for page in PAGES for b in blocks(page)]
    assert len(found) > 20
    assert [str(b) for b in found if (b.lang, b.role) not in KNOWN] == []
    pages = {"README.md", "docs/protocol.md", "docs/clients.md", "docs/configuration.md", "docs/deployment.md",
             "docs/security.md", "docs/troubleshooting.md"}  # fmt: skip
    assert pages <= set(PAGES)
    in_readme = {(b.lang, b.role) for b in blocks("README.md")}
    assert {("html", "client"), ("python", "client"), ("sh", "interactive"), ("json", "")} <= in_readme


# -- the configuration reference ------------------------------------------------------------------------------


def _default(option: config.Option) -> str:
    value = option.default
    if value in (None, []):
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return f"`{value}`"


def _table(options: tuple[config.Option, ...]) -> list[str]:
    rows = ["| flag | variable | default | |", "|---|---|---|---|"]
    for o in options:
        text = o.help.replace("|", "\\|")
        rows.append(f"| `{o.flag}` | `{o.variable}` | {_default(o)} | {text} |")
    return rows


def reference() -> str:
    lines = ["## Every command", "", *_table(config.LOGGING)]
    for name, options in config.COMMANDS.items():
        lines += ["", f"## `pgbridge {name}`", ""]
        if name == "dev":
            lines += ["Every option of `serve`, and:", ""]
            options = tuple(o for o in options if o not in config.SERVE)
        lines += _table(options)
    return "\n".join(lines)


def test_the_configuration_reference_is_the_code() -> None:
    page = DOCS / "configuration.md"
    text = page.read_text()
    start, end = "<!-- reference: generated from pgbridge/config.py -->\n", "<!-- end of reference -->"
    head, rest = text.split(start)
    current, tail = rest.split(end)
    wanted = f"\n{reference()}\n\n"
    if os.environ.get("PGBRIDGE_WRITE_DOCS"):
        page.write_text(head + start + wanted + end + tail)
    assert current == wanted, (
        "docs/configuration.md is out of date: PGBRIDGE_WRITE_DOCS=1 pytest tests/process/test_docs.py"
    )


def test_troubleshooting_quotes_what_the_programs_say() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "pgbridge").rglob("*.py"))
    headings = re.findall(r"^## (.*)$", (DOCS / "troubleshooting.md").read_text(), re.M)
    quoted = [(q, h) for h in headings if not h.endswith("(PostgreSQL)") for q in re.findall(r"`([^`]+)`", h)]
    assert len(quoted) >= 10
    assert [q for q, _ in quoted if q not in source] == []


async def test_every_metric_the_docs_name_is_served(dsn: str, posts: str, start_bridge: Bridges) -> None:
    named = {n for page in PAGES for n in re.findall(r"\bpgbridge_[a-z_]+", (ROOT / page).read_text())}
    running = await start_bridge(dsn, stats_interval=0.1)
    await wait_for(lambda: running.bridge.stats is not None, what="the change-log figures")
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{running.port}/metrics") as resp:
        text = await resp.text()
    served = set(re.findall(r"^(pgbridge_[a-z_]+)", text, re.M))  # samples, and families with none yet:
    for name, kind in re.findall(r"^# TYPE (pgbridge_[a-z_]+) (\w+)", text, re.M):
        served |= {name, f"{name}_bucket"} if kind == "histogram" else {name}
    assert len(named) > 15
    assert sorted(named - served) == []


# -- running the blocks -----------------------------------------------------------------------------------------


class Page:
    """What the blocks of one page run against: a bridge, a database, an environment, a scratch directory."""

    def __init__(self, bridge: RunningBridge, cluster: Cluster, tmp: Path) -> None:
        self.bridge, self.cluster, self.tmp = bridge, cluster, tmp
        secret = tmp / "jwt-secret"
        secret.write_text(SECRET)
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PGBRIDGE_", "PG")) and k != "DATABASE_URL"}
        self.env = {**keep, "PATH": f"{Path(sys.executable).parent}:{keep['PATH']}", "DATABASE_URL": bridge.dsn,
                    "PGBRIDGE_JWT_SECRET_FILE": str(secret)}  # fmt: skip
        self.installed: Path | None = None
        self.env_file: dict[str, str] = {}

    def local(self, text: str) -> str:
        text = text.replace("127.0.0.1:8000", f"127.0.0.1:{self.bridge.port}")
        for placeholder in TOKENS:
            text = text.replace(placeholder, token(collections=["posts"]))
        return text

    async def shell(self, script: str, *, timeout: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", script, cwd=self.tmp, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
        assert proc.returncode == 0, f"{script}\nexited {proc.returncode}:\n{out.decode()}"
        return out.decode()

    async def serve_until_healthy(self, argv: list[str], env: dict[str, str], stop_within: float = 20) -> None:
        port = int(argv[argv.index("--port") + 1])
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=self.tmp, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            await asyncio.wait_for(healthy(port), 30)
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(stop_within):
                out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()

    async def insert(self, title: str) -> None:
        conn = await asyncpg.connect(self.bridge.dsn)
        try:
            await conn.execute("INSERT INTO posts (title) VALUES ($1)", title)
        finally:
            await conn.close()


async def run_block(page: Page, block: Block) -> None:
    text = page.local(block.text)
    kind = (block.lang, block.role)
    if kind == ("sh", ""):
        await page.shell(text)
    elif kind == ("sh", "server"):
        argv = shlex.split(text.replace("--port 8000", f"--port {free_port()}"))
        await page.serve_until_healthy([str(Path(sys.executable).parent / argv[0]), *argv[1:]], page.env)
    elif kind == ("sh", "install"):
        page.installed = page.tmp / "opt-pgbridge"
        script = text.replace("/opt/pgbridge", str(page.installed)).replace("./pgbridge", str(ROOT))
        await page.shell(script, timeout=300)
    elif kind == ("sh", "interactive"):
        await run_interactive(page, text)
    elif kind == ("sh", "make"):
        check_make(text)
    elif kind == ("sh", "own-database"):
        check_own_database(text)
    elif kind == ("sh", "env-file"):
        lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
        page.env_file = dict(line.split("=", 1) for line in lines)
        assert sorted(set(page.env_file) - VARIABLES) == []
    elif kind == ("ini", ""):
        await run_unit(page, text)
    elif kind == ("sql", ""):
        psql = shlex.quote(page.cluster.psql)
        await page.shell(f"{psql} -X -q -v ON_ERROR_STOP=1 \"$DATABASE_URL\" <<'SQL'\n{text}\nSQL")
    elif kind == ("json", ""):
        message = json.loads(text)
        if "action" in message:
            protocol.parse_client_message(text)  # raises on a message the server would refuse
    elif kind == ("haproxy", ""):
        await run_haproxy(page, text)
    elif kind == ("javascript", "client"):
        await run_javascript(page, text)
    elif kind == ("html", "client"):
        await run_html(page, text)
    elif kind == ("python", "client"):
        await run_python(page, text)
    elif kind == ("text", ""):
        pass
    elif kind == ("ini", "pgbouncer"):
        pass  # tests/process/test_pgbouncer.py runs PgBouncer with it
    else:
        raise AssertionError(f"{block}: no test runs this kind of block")


def check_make(text: str) -> None:
    """Each line is ``make <target>``, with a comment or not, and the Makefile has that target."""
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    commands = [shlex.split(line, comments=True) for line in text.splitlines()]
    assert commands and all(len(argv) == 2 and argv[0] == "make" for argv in commands), text
    assert sorted({argv[1] for argv in commands} - targets) == []


def check_own_database(text: str) -> None:
    """Each exported variable is one pgbridge reads, and each ``pgbridge`` command parses."""
    commands = [shlex.split(line, comments=True) for line in text.splitlines()]
    assert commands and all(argv and argv[0] in ("export", "pgbridge") for argv in commands), text
    for argv in commands:
        if argv[0] == "export":
            name = argv[1].split("=", 1)[0]
            assert name in VARIABLES | {"DATABASE_URL"}, name
        else:
            _parser().parse_args(argv[1:])  # exits, failing the test, on a command or flag that does not exist


async def run_interactive(page: Page, text: str) -> None:
    """The interactive WebSocket client, typed into as a reader would: it subscribes, and a row inserted
    meanwhile is printed."""
    script = text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euo", "pipefail", "-c", script, cwd=page.tmp, env=page.env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    printed = b""

    async def until(wanted: bytes) -> None:
        nonlocal printed
        async with asyncio.timeout(20):
            while wanted not in printed:
                chunk = await proc.stdout.read(4096)  # type: ignore[union-attr]
                assert chunk, printed.decode()
                printed += chunk

    try:
        await until(b"Connected to ")
        proc.stdin.write(b'{"action": "subscribe", "collection": "posts"}\n')
        await until(b'< {"status":"subscribed","type":"subscribed","collection":"posts"')
        await page.insert("from the interactive client")
        await until(b"from the interactive client")
        assert b'< {"type":"posts.create"' in printed, printed.decode()
        proc.stdin.close()  # end of input: the client closes the connection and exits
        async with asyncio.timeout(20):
            assert await proc.wait() == 0, printed.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_unit(page: Page, text: str) -> None:
    """The systemd unit's command, with the environment file's settings, as systemd would run it."""
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(text)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/pgbridge/bin/pgbridge" and page.env_file, "the install and environment blocks come first"
    _parser().parse_args(argv[1:])  # every flag exists
    assert int(service["LimitNOFILE"]) >= 1024 and service["Restart"] == "always"
    settings = {**page.env_file, "DATABASE_URL": page.bridge.dsn,
                "PGBRIDGE_JWT_SECRET_FILE": page.env["PGBRIDGE_JWT_SECRET_FILE"]}  # fmt: skip
    assert page.installed is not None
    argv[0] = str(page.installed / "bin" / "pgbridge")
    argv[argv.index("--port") + 1] = str(free_port())
    keep = {k: v for k, v in page.env.items() if k not in ("PATH",)}
    await page.serve_until_healthy(argv, {**keep, "PATH": os.defpath, **settings},
                                   stop_within=float(service["TimeoutStopSec"]))  # fmt: skip


async def run_haproxy(page: Page, text: str) -> None:
    """The proxy terminating TLS in front of the page's bridge; a client subscribes over wss:// through it."""
    assert HAPROXY is not None, "haproxy is missing: .ci/run installs Debian's haproxy package"
    key, cert, pem = page.tmp / "key.pem", page.tmp / "cert.pem", page.tmp / "pgbridge.pem"
    await page.shell(f"openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout {key} -out {cert}"
                     f" 2>/dev/null && cat {cert} {key} > {pem}")  # fmt: skip
    port = free_port()
    cfg = page.tmp / "haproxy.cfg"
    cfg.write_text(text.replace("bind :443", f"bind 127.0.0.1:{port}").replace("/etc/haproxy/pgbridge.pem", str(pem)))
    await page.shell(f"{HAPROXY} -c -q -f {cfg}")
    proxy = await asyncio.create_subprocess_exec(HAPROXY, "-db", "-f", str(cfg), stdout=asyncio.subprocess.DEVNULL,
                                                 stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    try:
        url = f"wss://127.0.0.1:{port}/api/v1/realtime/ws"
        for attempt in range(50):
            try:
                ws = await websockets.connect(url, ssl=tls, subprotocols=["bearer", token()])  # type: ignore[list-item]
                break
            except OSError:
                await asyncio.sleep(0.1 * (attempt + 1))
        async with ws:
            await ws.send(json.dumps({"action": "subscribe", "collection": "posts"}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            await page.insert("through the proxy")
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert event["type"] == "posts.create" and event["data"]["title"] == "through the proxy"
        async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{port}/metrics", ssl=tls) as resp:
            assert resp.status == 403  # the example keeps /metrics to the monitoring network
    finally:
        proxy.kill()
        await proxy.wait()


async def run_javascript(page: Page, text: str) -> None:
    """A classic script of a ``file://`` page."""
    html = page.tmp / "client.html"
    html.write_text(f"<!doctype html><script>{text}</script>")
    await run_in_chromium(page, html.as_uri(), "from the javascript example")


async def run_html(page: Page, text: str) -> None:
    """The page itself (a module script importing the bridge's ``/client.js``), served over HTTP from
    another origin than the bridge's, as an application's pages usually are."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=f"<!doctype html>\n{text}", content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        assert port != page.bridge.port
        await run_in_chromium(page, f"http://127.0.0.1:{port}/", "from the html example")
    finally:
        await runner.cleanup()


async def run_in_chromium(page: Page, url: str, title: str) -> None:
    async with Browser(page.tmp / "profile") as browser:
        await browser.goto(url)
        await browser.until_console(lambda line: line == "subscribed to posts")
        await page.insert(title)
        await browser.until_console(lambda line: line.startswith("posts.create {") and title in line)
        assert browser.errors == [] and not any("error" in line for line in browser.console)


async def run_python(page: Page, text: str) -> None:
    script = page.tmp / "client.py"
    script.write_text(text)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**page.env, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert proc.stdout is not None
    printed: list[str] = []

    async def until(wanted: str) -> None:
        async with asyncio.timeout(20):
            while not any(wanted in line for line in printed):
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                assert line, "".join(printed)
                printed.append(line.decode())

    try:
        await until("subscribed to posts")
        await page.insert("from the python example")
        await until("from the python example")
        assert any(line.startswith("posts.create {") and "from the python example" in line for line in printed)
    finally:
        proc.kill()
        await proc.wait()


def _needs(page: str) -> Iterator[Any]:
    kinds = {(b.lang, b.role) for b in blocks(page)}
    if kinds & {("javascript", "client"), ("html", "client")}:
        yield needs_chromium
    if ("haproxy", "") in kinds:
        yield needs_haproxy


@pytest.mark.parametrize("page", [pytest.param(p, marks=list(_needs(p))) for p in PAGES])
async def test_the_blocks_of_a_page_run(
    page: str, dsn: str, posts: str, cluster: Cluster, tmp_path: Path, start_bridge: Bridges
) -> None:
    running = await start_bridge(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        context = Page(running, cluster, tmp_path)
        for block in blocks(page):
            try:
                await run_block(context, block)
            except BaseException as exc:
                exc.add_note(f"in {block}")
                raise
    finally:
        await conn.execute("""DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'bridge') THEN
                              DROP OWNED BY bridge; DROP ROLE bridge; END IF; END $$""")  # fmt: skip
        await conn.close()
