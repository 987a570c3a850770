"""``make run`` (``pgbridge dev``) as a new user meets it: what it prints works, in a real browser too."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from tests.browser.chromium import Browser, needs_chromium
from tests.helpers import free_port


@needs_chromium
async def test_dev_prints_an_inspector_link_and_a_psql_line_that_work(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGBRIDGE_", "PG")) and k != "DATABASE_URL"}
    dev = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgbridge", "dev", "--data-dir", str(tmp_path / "data"), "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert dev.stdout is not None
    printed = ""
    try:
        async with asyncio.timeout(60):
            while "Insert a post" not in printed or not printed.rstrip().endswith("VALUES ('hello')\""):
                line = await dev.stdout.readline()
                assert line, f"pgbridge dev exited: {printed}"
                printed += line.decode()
        inspector = re.search(r"Inspector: (\S+)", printed)
        insert = printed.rstrip().splitlines()[-1].strip()
        assert inspector is not None and inspector.group(1).startswith(f"http://127.0.0.1:{port}/#")
        async with Browser(tmp_path / "profile") as browser:
            await browser.goto(inspector.group(1))  # the token and collection are filled in from the link
            await browser.until("document.getElementById('state').dataset.state === 'live'", what="the page to connect")
            psql = await asyncio.create_subprocess_shell(insert, stderr=asyncio.subprocess.PIPE)
            _, error = await psql.communicate()
            assert psql.returncode == 0, error.decode()
            await browser.until("document.querySelector('#events tbody').innerText.includes('\"title\": \"hello\"')",
                                what="the printed INSERT to show")  # fmt: skip
    finally:
        dev.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rest = await dev.stdout.read()
            assert await dev.wait() == 0, rest.decode()
