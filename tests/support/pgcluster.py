"""A throwaway PostgreSQL cluster on a free loopback port, for tests and benchmarks.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user
(created by Debian's package). Data lives in a temp dir and is deleted on ``close``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid

from sqlalchemy import create_engine

from said.broker import free_port


def find_pg_bin() -> str | None:
    """The PostgreSQL server binaries folder, or None when PostgreSQL is not installed."""
    if os.environ.get("SAID_PG_BIN"):
        return os.environ["SAID_PG_BIN"]
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return os.path.dirname(candidates[0])
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


class ThrowawayPostgres:
    """initdb + pg_ctl in a temp dir; ``url(db)`` gives SQLAlchemy URLs."""

    def __init__(self, bin_dir: str) -> None:
        self.bin = bin_dir
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="said-pg-")
        self.data = os.path.join(self.dir, "data")
        self.user_prefix: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user_prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.user_prefix, *args], check=check, capture_output=True, text=True, cwd=self.dir
        )

    def start(self) -> ThrowawayPostgres:
        if not os.path.exists(self.data):
            self._run(
                os.path.join(self.bin, "initdb"),
                "-D",
                self.data,
                "-U",
                "said",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        out = self._run(
            os.path.join(self.bin, "pg_ctl"),
            "-D",
            self.data,
            "-o",
            opts,
            "-l",
            os.path.join(self.dir, "log"),
            "-w",
            "-t",
            "30",
            "start",
            check=False,
        )
        if out.returncode != 0:
            log = open(os.path.join(self.dir, "log")).read()[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {out.stderr}\n{log}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart_after(self, seconds: float) -> None:
        """Stop now, start again after ``seconds`` (the outage tests)."""
        self.stop("immediate")
        time.sleep(seconds)
        self.start()

    def create_database(self) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"  # generated, so safe to quote into DDL
        engine = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://said@127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
