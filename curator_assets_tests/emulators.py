"""Real object-store emulators on loopback, started once per test session.

- S3: ``moto_server`` with IAM authentication on, so a wrong secret is refused (SigV4 is checked).
- GCS: ``gcp-storage-emulator`` in memory (it has no authentication; gcsfs talks to it as "anon").
- Azure Blob: Azurite, with its documented development account ``devstoreaccount1`` (SharedKey
  signatures are checked).

Each emulator runs in its own process group and is stopped at the end of the session. A missing
emulator fails the tests that need it, with the command that installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
STORE_NAMES = ("s3", "gcs", "azure")

# Azurite's documented, public development account (the same for every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

# moto lets this many requests through unauthenticated (to create the IAM user below), then
# checks every request's signature against the IAM access keys it knows.
_MOTO_SETUP_REQUESTS = 3


def pytest_configure(config: pytest.Config) -> None:
    # gcsfs reads this at import time; when on, it probes the bucket type over gRPC, which an
    # emulator cannot answer, and stalls for minutes. Set before any test imports gcsfs.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


@dataclass
class ObjectStore:
    """One running emulator and how to reach it from fsspec, a subprocess, or the resource."""

    name: str  # s3 | gcs | azure
    protocol: str  # the URL scheme: s3 | gs | az
    endpoint: str
    storage_options: dict[str, Any]
    # Environment that lets a child process (the CLI) reach the store, and the CLI's
    # --storage-option flags for what the environment cannot carry.
    cli_env: dict[str, str] = field(default_factory=dict)
    cli_args: list[str] = field(default_factory=list)
    # Credential environment variables (name -> value), as the storage resource reads them.
    credentials_env: dict[str, str] = field(default_factory=dict)
    # A credential value that must never show up in logs or metadata (None: the store has none).
    secret: str | None = None

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path.lstrip('/')}"

    def filesystem(self, *, fresh: bool = False):
        """An fsspec filesystem for the store; ``fresh`` gives an instance of its own (no shared
        listing cache), like another process writing to the store would have."""
        import fsspec

        return fsspec.filesystem(self.protocol, skip_instance_cache=fresh, **self.storage_options)

    def new_bucket(self) -> str:
        """A new, empty bucket (container) with a unique name."""
        bucket = f"curator-{uuid.uuid4().hex[:16]}"
        self.filesystem(fresh=True).mkdir(bucket)
        return bucket

    def upload(self, local_dir: Path, remote: str) -> str:
        """Copy every file under ``local_dir`` to ``remote`` (``bucket/prefix``); the URL of it."""
        fs = self.filesystem(fresh=True)
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            fs.put_file(str(path), f"{remote}/{path.relative_to(local_dir).as_posix()}")
        return self.url(remote)


def find_tool(name: str, install_hint: str) -> str:
    """The path of an emulator's command: beside this Python first (the virtualenv's bin, which
    need not be on PATH), then on PATH. Fails the test when it is missing."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"the {name!r} emulator command is not installed; {install_hint}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A server process in its own session (so stopping it stops its children too)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=log_path.parent, env={**os.environ, **(env or {})}, start_new_session=True,
        )

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = START_TIMEOUT_S, http: bool = True) -> bool:
        """True once the port accepts connections (and answers HTTP when ``http``); False when the
        process exited first. Raises TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if http:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=2).close()
                    except urllib.error.HTTPError:
                        pass  # any HTTP status means the server is answering
                return True
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
            except ProcessLookupError:
                pass
        self._log.close()


def start_emulator(name: str, make_argv, workdir: Path, *, http: bool = True,
                   env: dict[str, str] | None = None, attempts: int = 3) -> Emulator:
    """Start ``make_argv(port)`` on a free loopback port and wait until it answers. A port taken
    between choosing and binding makes the server exit: try another one."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        port = free_port()
        emu = Emulator(name, make_argv(port), port, workdir / f"{name}-{attempt}.log", env)
        try:
            if emu.wait_ready(http=http):
                return emu
        except TimeoutError as exc:
            emu.stop()
            pytest.fail(f"{exc}; its log ends with:\n{emu.log_tail()}", pytrace=False)
        emu.stop()
    pytest.fail(f"{name} exited before answering ({' '.join(emu.argv)}); its log ends with:\n{emu.log_tail()}",
                pytrace=False)


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    tool = find_tool("moto_server", "install it with: pip install 'moto[server]'")
    emu = start_emulator(
        "moto_server", lambda port: [tool, "-H", "127.0.0.1", "-p", str(port)],
        tmp_path_factory.mktemp("moto"), http=False,  # an HTTP probe would use up a setup request
        env={"INITIAL_NO_AUTH_ACTION_COUNT": str(_MOTO_SETUP_REQUESTS)},
    )
    try:
        endpoint = f"http://127.0.0.1:{emu.port}"
        key_id, secret = _moto_access_key(endpoint)
        yield ObjectStore(
            name="s3", protocol="s3", endpoint=endpoint,
            storage_options={"key": key_id, "secret": secret, "endpoint_url": endpoint},
            cli_env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                     "AWS_DEFAULT_REGION": "us-east-1"},
            credentials_env={"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret},
            secret=secret,
        )
    finally:
        emu.stop()


def _moto_access_key(endpoint: str) -> tuple[str, str]:
    """An IAM user allowed everything, and its (access key id, secret): the store's credentials."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="curator")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="curator", PolicyName="everything", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="curator")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def gcs_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    tool = find_tool("gcp-storage-emulator", "install it with: pip install gcp-storage-emulator")
    emu = start_emulator(
        "gcp-storage-emulator",
        lambda port: [tool, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        tmp_path_factory.mktemp("gcs"),
    )
    try:
        endpoint = f"http://127.0.0.1:{emu.port}"
        yield ObjectStore(
            name="gcs", protocol="gs", endpoint=endpoint,
            storage_options={"token": "anon", "endpoint_url": endpoint},
            cli_env={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"},
            cli_args=["--storage-option", "token=anon", "--storage-option", f"endpoint_url={endpoint}"],
            credentials_env={"GCS_TOKEN": "anon"},
            secret=None,
        )
    finally:
        emu.stop()


@pytest.fixture(scope="session")
def azure_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    tool = find_tool("azurite-blob", "install Azurite with: npm install -g azurite")
    workdir = tmp_path_factory.mktemp("azurite")
    data = workdir / "data"
    data.mkdir()
    emu = start_emulator(
        "azurite-blob",
        lambda port: [tool, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data),
                      "--skipApiVersionCheck", *_azurite_quiet_flags(tool)],
        workdir,
    )
    try:
        endpoint = f"http://127.0.0.1:{emu.port}/{AZURITE_ACCOUNT}"
        connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};"
        )
        yield ObjectStore(
            name="azure", protocol="az", endpoint=endpoint,
            storage_options={"connection_string": connection_string},
            cli_env={"AZURE_STORAGE_CONNECTION_STRING": connection_string},
            credentials_env={"AZURE_STORAGE_CONNECTION_STRING": connection_string},
            secret=AZURITE_KEY,
        )
    finally:
        emu.stop()


def _azurite_quiet_flags(tool: str) -> list[str]:
    # Newer Azurite sends telemetry unless told not to (no network here: it only logs errors).
    try:
        out = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["--disableTelemetry"] if "--disableTelemetry" in out else []


@pytest.fixture(params=STORE_NAMES)
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each emulated object store in turn (S3, GCS, Azure Blob)."""
    return request.getfixturevalue(f"{request.param}_store")
