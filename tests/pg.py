"""A throw-away PostgreSQL server on 127.0.0.1 for tests (never the machine's own cluster).

``initdb`` refuses to run as root, so when the tests run as root the data directory is created
inside a temporary folder owned by the ``postgres`` user and every server command runs through
``su postgres``. When the tests run as an ordinary user the commands run directly.

Use the ``postgres_url`` fixture (session scope)::

    from pg import postgres_url  # noqa: F401  (pytest fixture)

    @pytest.mark.postgres
    def test_x(postgres_url): ...

It skips (with the reason) when no PostgreSQL server binaries are installed. Each call of
:func:`fresh_database` gives a new empty database on the same server, so tests do not share studies.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest Debian layout first), or None."""
    env = os.environ.get("EXL2OPT_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(os.path.realpath(which)).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def _version_key(path: str) -> int:
    part = Path(path).parent.name
    return int(part) if part.isdigit() else 0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """One running server: ``url`` is the SQLAlchemy URL of the ``postgres`` database."""

    bin_dir: Path
    root: Path
    port: int
    as_postgres_user: bool

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self.as_postgres_user:
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(shlex.quote(a) for a in argv)]
        else:
            cmd = argv
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        init = self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                          "--no-sync", "-E", "UTF8"])
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        start = self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-o", opts,
                           "-l", str(self.root / "log"), "-w", "-t", "60", "start"], timeout=90)
        if start.returncode != 0:
            log = (self.root / "log").read_text(errors="replace")[-800:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()[-500:]} {log}")

    def stop(self) -> None:
        self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                  timeout=60)

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_server() -> PgServer:
    """Start a private server in a fresh temporary folder; raises RuntimeError if it cannot."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("initdb")
    as_pg = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="exl2opt-pg-"))
    if as_pg:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    os.chmod(root, 0o700)
    srv = PgServer(bin_dir=bin_dir, root=root, port=free_port(), as_postgres_user=as_pg)
    srv.start()
    return srv


_SERVER: dict[str, PgServer] = {}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """A private PostgreSQL server for the whole test session (skips if none can be started)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]')")
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb) not found; apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb as")
    try:
        srv = start_server()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not start a private PostgreSQL server: {e}")
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(srv.root, ignore_errors=True)


def fresh_database(server: PgServer) -> str:
    """A new empty database on ``server``; returns its SQLAlchemy URL."""
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture()
def postgres_url(postgres_server: PgServer) -> str:
    """URL of a new empty database for one test."""
    return fresh_database(postgres_server)
