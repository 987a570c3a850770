"""``docs/``: every code block is run against a real bridge, and the reference matches the code.

Blocks are fenced with a language and, where running them needs more than running them, a role:
``sh`` runs in bash (``sh server`` starts a server and stops it once healthy, ``sh install`` installs
into a temporary directory, ``sh env-file`` is a systemd environment file), ``sql`` runs in psql, ``json``
must parse (client messages must be valid ones), ``ini`` is the systemd unit (its command runs with the
environment file), ``haproxy`` runs as a TLS proxy in front of a bridge, and ``javascript client`` /
``python client`` run in Chromium / Python and must print a row inserted meanwhile. The address
``127.0.0.1:8000`` and ``YOUR_TOKEN`` are replaced by the test bridge's.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shlex
import shutil
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

from pgbridge import config, protocol
from pgbridge.cli import _parser
from tests.browser.chromium import Browser, needs_chromium
from tests.helpers import SECRET, Cluster, RunningBridge, free_port, healthy, token, wait_for

if TYPE_CHECKING:
    from tests.conftest import Bridges

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
FENCE = re.compile(r"^```(\S*)[ \t]*(\S*)\n(.*?)^```", re.M | re.S)
KNOWN = {("sh", ""), ("sh", "server"), ("sh", "install"), ("sh", "env-file"), ("sql", ""), ("json", ""), ("ini", ""),
         ("haproxy", ""), ("javascript", "client"), ("python", "client")}  # fmt: skip
VARIABLES = {o.variable for options in (config.LOGGING, *config.COMMANDS.values()) for o in options}
HAPROXY = shutil.which("haproxy")
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None and not os.environ.get("CI"), reason="haproxy is not installed (.ci/run installs it)"
)


@dataclass(frozen=True)
class Block:
    page: str
    lang: str
    role: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"docs/{self.page}:{self.line} ({self.lang} {self.role})".replace(" )", ")")


def blocks(page: str) -> list[Block]:
    text = (DOCS / page).read_text()
    return [Block(page, m[1], m[2], m[3], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def test_every_block_is_one_the_tests_run() -> None:
    found = [b for page in PAGES for b in blocks(page)]
    assert len(found) > 20
    assert [str(b) for b in found if (b.lang, b.role) not in KNOWN] == []
    assert {"protocol.md", "configuration.md", "deployment.md", "security.md", "troubleshooting.md"} <= set(PAGES)


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
    named = {n for page in PAGES for n in re.findall(r"\bpgbridge_[a-z_]+", (DOCS / page).read_text())}
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
        return text.replace("YOUR_TOKEN", token(collections=["posts"]))

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
    elif kind == ("python", "client"):
        await run_python(page, text)
    else:
        raise AssertionError(f"{block}: no test runs this kind of block")


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
    html = page.tmp / "client.html"
    html.write_text(f"<!doctype html><script>{text}</script>")
    async with Browser(page.tmp / "profile") as browser:
        await browser.goto(html.as_uri())
        await browser.until_console(lambda line: line == "subscribed to posts")
        await page.insert("from the javascript example")
        await browser.until_console(lambda line: line.startswith("posts.create") and "javascript example" in line)
        assert browser.errors == [] and not any("error" in line for line in browser.console)


async def run_python(page: Page, text: str) -> None:
    script = page.tmp / "client.py"
    script.write_text(text)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=page.env)  # fmt: skip
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
        await until('posts.create {"id"')
        assert any("from the python example" in line for line in printed)
    finally:
        proc.kill()
        await proc.wait()


def _needs(page: str) -> Iterator[Any]:
    kinds = {(b.lang, b.role) for b in blocks(page)}
    if ("javascript", "client") in kinds:
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
