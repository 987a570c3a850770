"""Debian's HAProxy in front of pgbridge replicas, for the tests and the benchmark.

The configuration is the one ``docs/deployment.md`` shows under "Replicas behind HAProxy", read from the
page itself, with the test's addresses: the frontend on a free port without TLS, one ``server`` line per
replica (the page has three), and a stats socket in the scratch directory, through which the tests read
each server's state as HAProxy sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

HAPROXY = shutil.which("haproxy")
INSTALL = "make system-packages (or: apt-get install haproxy)"
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None and not os.environ.get("CI"), reason=f"haproxy is not installed: {INSTALL}"
)
"""Skip where haproxy is missing, except in CI, where a missing haproxy fails the test."""

DEPLOYMENT = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
_BLOCK = re.compile(r"^```haproxy\n(.*?)^```", re.M | re.S)
_BIND = "bind :443 ssl crt /etc/haproxy/pgbridge.pem"
_SERVER = re.compile(r"^(\s*server (\S+) )127\.0\.0\.1:\d+(.*)$", re.M)


def documented() -> str:
    """The replicas' configuration of docs/deployment.md (its one haproxy block that balances)."""
    found = [b for b in _BLOCK.findall(DEPLOYMENT.read_text()) if "balance roundrobin" in b]
    assert len(found) == 1, "docs/deployment.md should show one haproxy configuration for replicas"
    return str(found[0])


def configuration(port: int, replicas: list[int], stats: Path) -> str:
    """The documented configuration, serving on ``port`` without TLS, balancing over the ``replicas``' ports."""
    text = documented()
    assert _BIND in text and len(_SERVER.findall(text)) >= len(replicas), text
    text = text.replace(_BIND, f"bind 127.0.0.1:{port}")
    lines = iter(replicas)

    def server(match: re.Match[str]) -> str:
        replica = next(lines, None)
        return "" if replica is None else f"{match[1]}127.0.0.1:{replica}{match[3]}"

    text = _SERVER.sub(server, text)
    return text + f"\nglobal\n    stats socket {stats} mode 600 level admin\n"


class HAProxy:
    """``haproxy -db`` with :func:`configuration`, in ``directory``; :meth:`stop` always stops it."""

    def __init__(self, directory: Path, replicas: list[int]) -> None:
        assert HAPROXY is not None, f"haproxy is not installed: {INSTALL}"
        self.port = free_port()
        self.directory = directory
        self.socket = directory / "haproxy.sock"
        self.cfg = directory / "haproxy.cfg"
        self.cfg.write_text(configuration(self.port, replicas, self.socket))
        self.log = directory / "haproxy.log"
        self.names = [f"bridge{i + 1}" for i in range(len(replicas))]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert HAPROXY is not None
        check = await asyncio.create_subprocess_exec(
            HAPROXY, "-c", "-q", "-f", str(self.cfg), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await check.communicate()
        assert check.returncode == 0, f"haproxy refuses {self.cfg}:\n{out.decode()}"
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(HAPROXY, "-db", "-f", str(self.cfg), stdout=log,
                                                             stderr=asyncio.subprocess.STDOUT)  # fmt: skip
        await wait_for(self._answers, what="haproxy to start")

    async def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.returncode is None, f"haproxy exited with {self.proc.returncode}: {self.log.read_text()}"
        try:
            await self.states()
        except OSError:
            return False
        return True

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def command(self, line: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it: ``UP``, ``DOWN``, ``UP 1/2`` (going down), ..."""
        lines = (await self.command("show stat")).splitlines()
        header = lines[0].lstrip("# ").split(",")
        proxy, name, status = header.index("pxname"), header.index("svname"), header.index("status")
        rows = [line.split(",") for line in lines[1:] if line]
        return {r[name]: r[status] for r in rows if r[proxy] == "pgbridge" and r[name] in self.names}

    async def until(self, server: str, state: str, timeout: float = 20) -> None:
        """Wait until HAProxy has ``server`` in ``state`` (``UP`` or ``DOWN``)."""

        async def reached() -> bool:
            return (await self.states()).get(server) == state

        await wait_for(reached, timeout=timeout, what=f"haproxy to see {server} {state}")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)  # with -db: stops at once, closing every connection
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
