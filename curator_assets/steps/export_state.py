"""What an export output folder remembers between runs, and who may write it.

``DST/.export/state.json`` says what each output shard holds (a digest of its records' sources
and places, its sizes) and the manifest's digest. Each shard written is also recorded at once in a
journal (``.export/journal.jsonl``, one line appended and synced per shard; on an object store,
one small object per shard under ``.export/journal/``), so a run killed at any point loses no
finished shard, and the cost of remembering stays one small write per shard, whatever the number
of shards (rewriting the whole state after each shard grows with the square of their number).
At the end the state is written whole and the journal emptied.

One export at a time writes a folder: :class:`WriterLease`. On local disk an exclusive ``flock``
on ``.export/lock`` (the kernel drops it when the process ends, however it ends); on an object
store a lease object, renewed while the export runs and taken over only once it is older than
``LEASE_S`` (its holder is gone).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
from typing import Any

from curator_assets.store.atomic import write_atomic
from curator_assets.store.fs import is_local

STATE_DIR = ".export"
STATE_NAME = "state.json"
JOURNAL_NAME = "journal.jsonl"  # local disk
JOURNAL_DIR = "journal"  # object stores: one object per shard
LOCK_NAME = "lock"
LEASE_NAME = "lease.json"
FORMAT_VERSION = 1
LEASE_S = 120.0  # an object-store lease not renewed for this long belongs to an export that is gone
RENEW_S = 20.0


class ExportBusy(RuntimeError):
    """Another export is writing the same output folder."""


class ExportState:
    """The state of an output folder: ``load()``, then ``record()`` per shard written, ``save()``
    whenever the whole changes, ``close()`` at the end (writes it whole, empties the journal)."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root
        self.local = is_local(fs)
        self.data: dict[str, Any] = {}
        self._saved = ""
        self._journal_fd: int | None = None
        self._journaled = False

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, STATE_DIR, *parts)

    def load(self) -> dict[str, Any]:
        """The state as the last run left it, its journal merged in (what a killed run finished)."""
        raw = self._read(self.path(STATE_NAME))
        try:
            state = json.loads(raw) if raw else {}
        except ValueError:
            state = {}
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            state = {"version": FORMAT_VERSION, "shards": {}}
        self._saved = json.dumps(state, sort_keys=True)
        journal = self._journal_entries()
        if journal:
            state["shards"] = {**state.get("shards", {}), **journal}
            self._journaled = True
        self.data = state
        return state

    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Shard ``name`` is written (its tar and index in place): remember it now."""
        self.data.setdefault("shards", {})[name] = entry
        line = json.dumps({"shard": name, "entry": entry}, sort_keys=True) + "\n"
        self._journaled = True
        if self.local:
            if self._journal_fd is None:
                os.makedirs(self.path(), exist_ok=True)
                self._journal_fd = os.open(self.path(JOURNAL_NAME), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._journal_fd, line.encode())
            os.fsync(self._journal_fd)
        else:
            write_atomic(self.fs, self.path(JOURNAL_DIR, name + ".json"), line.encode())

    def save(self) -> None:
        """Write the state whole (when it changed), then empty the journal it now holds."""
        text = json.dumps(self.data, sort_keys=True)
        if text != self._saved:
            write_atomic(self.fs, self.path(STATE_NAME), text.encode())
            self._saved = text
        if self._journaled:
            self._clear_journal()

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _journal_entries(self) -> dict[str, Any]:
        if self.local:
            raw = self._read(self.path(JOURNAL_NAME)) or b""
            lines = raw.split(b"\n")
        else:
            try:
                paths = sorted(self.fs.find(self.path(JOURNAL_DIR)))
            except (FileNotFoundError, NotADirectoryError):
                paths = []
            lines = list(self.fs.cat(paths).values()) if paths else []
        out: dict[str, Any] = {}
        for line in lines:  # in the order written: a later line about a shard wins
            try:
                item = json.loads(line)
                out[str(item["shard"])] = dict(item["entry"])
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a run killed while appending it, or an empty one
        return out

    def _clear_journal(self) -> None:
        if self.local:
            self.close()
            try:
                os.unlink(self.path(JOURNAL_NAME))
            except FileNotFoundError:
                pass
        else:
            try:
                paths = self.fs.find(self.path(JOURNAL_DIR))
                if paths:
                    self.fs.rm(paths)
            except (FileNotFoundError, NotADirectoryError):
                pass
        self._journaled = False


class WriterLease:
    """Held while an export writes its output folder; a second export of the same folder stops at
    :meth:`acquire` with :class:`ExportBusy`, naming the holder."""

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root, url
        self.local = is_local(fs)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
                      "since": round(time.time(), 3)}
        self._fd: int | None = None
        self._renewer: threading.Thread | None = None
        self._done = threading.Event()

    def path(self, name: str) -> str:
        return posixpath.join(self.root, STATE_DIR, name)

    def acquire(self) -> None:
        if self.local:
            self._lock_local()
        else:
            self._take_lease()

    def release(self) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        elif not self.local:
            try:
                if self._holder() == self.owner["token"]:
                    self.fs.rm(self.path(LEASE_NAME))
            except (FileNotFoundError, OSError):
                pass

    def _busy(self, holder: dict[str, Any], extra: str = "") -> ExportBusy:
        since = float(holder.get("since") or 0)
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
        return ExportBusy(f"{self.url}: another export is writing it (host {holder.get('host', '?')}, "
                          f"pid {holder.get('pid', '?')}{when}){extra}; wait for it to finish")

    # local disk: an exclusive flock, dropped by the kernel when its process ends
    def _lock_local(self) -> None:
        import fcntl

        os.makedirs(self.path(""), exist_ok=True)
        fd = os.open(self.path(LOCK_NAME), os.O_RDONLY | os.O_CREAT, 0o644)  # never written: a rerun changes nothing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _flock_holder(os.fstat(fd).st_ino)
            os.close(fd)
            raise self._busy({"host": socket.gethostname(), "pid": pid or "?", "since": _started(pid)}) from None
        self._fd = fd

    # object stores: a lease object renewed while the export runs
    def _read_lease(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.fs.cat_file(self.path(LEASE_NAME)))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _holder(self) -> str | None:
        lease = self._read_lease()
        return None if lease is None else lease.get("token")

    def _take_lease(self) -> None:
        lease = self._read_lease()
        if lease is not None and lease.get("token") != self.owner["token"]:
            age = time.time() - float(lease.get("renewed") or 0)
            if 0 <= age < LEASE_S or age < -LEASE_S:  # renewed lately (or a clock far ahead: not ours to judge)
                raise self._busy(lease, f", renewed {max(age, 0):.0f} s ago")
        self._write_lease()
        time.sleep(min(1.0, RENEW_S / 10))  # two exports that started together: the later write wins ...
        if self._holder() != self.owner["token"]:  # ... and the other one stops here
            raise self._busy(self._read_lease() or {})
        self._renewer = threading.Thread(target=self._renew, name="export-lease", daemon=True)
        self._renewer.start()

    def _write_lease(self) -> None:
        body = {**self.owner, "renewed": round(time.time(), 3)}
        write_atomic(self.fs, self.path(LEASE_NAME), json.dumps(body).encode())

    def _renew(self) -> None:
        while not self._done.wait(RENEW_S):
            try:
                self._write_lease()
            except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease lasts LEASE_S
                continue


def _flock_holder(inode: int) -> int | None:
    """The process holding a flock on the file with this inode (Linux's /proc/locks), if known."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


def _started(pid: int | None) -> float:
    """When process ``pid`` started (seconds since the epoch), or 0 when unknown."""
    try:
        return os.stat(f"/proc/{pid}").st_mtime if pid else 0.0
    except OSError:
        return 0.0
