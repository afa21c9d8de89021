"""Real Redis and Postgres servers for the cluster tests, on loopback, in a temp folder.

Both come from Debian (`redis-server`, `postgresql`; `scripts/test.sh` installs them). A missing binary
fails the set-up with the package to install: the tests never pass by skipping the cluster.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A Redis on a free loopback port, no persistence; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (Debian: apt-get install -y redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(folder / "redis.log", "wb")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or under Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed (Debian: apt-get install -y postgresql)")
    return found


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """The variables deploy/cluster/dagster.yaml reads."""
        return {"CURATOR_PG_HOST": self.host, "CURATOR_PG_PORT": str(self.port), "CURATOR_PG_USER": self.user,
                "CURATOR_PG_PASSWORD": self.password, "CURATOR_PG_DB": self.db}


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A fresh cluster (initdb) on a free loopback port with password authentication, in a temp
    folder of its own (pytest's are private to this user; the server may run as `postgres`)."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    folder = Path(tempfile.mkdtemp(prefix="curator-pg-"))
    folder.chmod(0o755)
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    pg = Postgres("127.0.0.1", free_port(), "curator", secrets.token_hex(12), "curator")
    pwfile = folder / "pw"
    pwfile.write_text(pg.password)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        shutil.chown(pwfile, "postgres")
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", pg.user, f"--pwfile={pwfile}",
                                    "--auth=scram-sha-256", "-E", "UTF8"]), **run)
    options = f"-p {pg.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-l", str(folder / "postgres.log"), "-w",
                                    "-o", options, "start"]), **run)
    try:
        subprocess.run(_as_server_user([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg.port),
                                        "-U", pg.user, pg.db]), env={**os.environ, "PGPASSWORD": pg.password},
                       **run)
        yield pg
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
