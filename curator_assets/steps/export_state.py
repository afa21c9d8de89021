"""What an export output folder remembers between runs, and who may write it.

``DST/.export/state.json`` says what each output shard holds (a digest of its records' sources
and places, its sizes) and the manifest's digest. Each shard written is also recorded at once in a
journal (``.export/journal.jsonl``, one line appended and synced per shard; on an object store,
one small object per shard under ``.export/journal/``), so a run killed at any point loses no
finished shard, and the cost of remembering stays one small write per shard, whatever the number
of shards (rewriting the whole state after each shard grows with the square of their number).
At the end the state is written whole and the journal emptied. Before a shard's files are replaced,
a tombstone for its name goes in the journal (:meth:`ExportState.forget`): a run killed between the
rename and the record leaves a name no entry vouches for, which the next run writes again (or
removes, when it has fewer shards).

One export at a time writes a folder: :class:`WriterLease`. On local disk an exclusive ``flock``
on ``.export/lock`` (the kernel drops it when the process ends, however it ends); on an object
store a lease object, renewed while the export runs and taken over only once it is older than
``LEASE_S`` (its holder is gone). Its holder checks, at each renewal, that the lease is still its
own and was renewed in time; a lease lost (a pause longer than ``LEASE_S``, a store unreachable
that long) stops the export with :class:`ExportBusy` before it writes anything else. Object
stores offer no portable compare-and-swap through fsspec: two exports that start within the
read-back wait of each other are told apart by that wait alone.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable
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


def read_or_none(fs, path: str) -> bytes | None:
    """The bytes at ``path``, or None when there is nothing there."""
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


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
        raw = read_or_none(self.fs, self.path(STATE_NAME))
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
        self._journal(name, entry)

    def forget(self, name: str) -> None:
        """Shard ``name``'s files are about to be replaced: until :meth:`record` says what they hold,
        nothing vouches for them (a run killed in between leaves the name to be written again)."""
        shards = self.data.setdefault("shards", {})
        if name in shards and shards[name] is None:
            return  # already forgotten (a rerun of a killed run)
        shards[name] = None
        self._journal(name, None)

    def _journal(self, name: str, entry: dict[str, Any] | None) -> None:
        line = (json.dumps({"shard": name, "entry": entry}, sort_keys=True) + "\n").encode()
        self._journaled = True
        if not self.local:
            write_atomic(self.fs, self.path(JOURNAL_DIR, name + ".json"), line)
            return
        if self._journal_fd is None:
            self._journal_fd = self._open_journal()
        view = memoryview(line)
        while view:  # a short write (a full disk) is retried, or raises
            view = view[os.write(self._journal_fd, view):]
        os.fsync(self._journal_fd)

    def _open_journal(self) -> int:
        """The journal, opened to append; a line torn by a killed run is ended first, so the next
        line is not glued to it."""
        os.makedirs(self.path(), exist_ok=True)
        fd = os.open(self.path(JOURNAL_NAME), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        except BaseException:
            os.close(fd)
            raise
        return fd

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

    def _journal_entries(self) -> dict[str, Any]:
        """Shard name -> its entry, or None for a tombstone (its files are not vouched for)."""
        if self.local:
            raw = read_or_none(self.fs, self.path(JOURNAL_NAME)) or b""
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
                entry = item["entry"]
                out[str(item["shard"])] = None if entry is None else dict(entry)
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

    def __init__(self, fs, root: str, url: str, on_lost: Callable[[], None] | None = None):
        self.fs, self.root, self.url = fs, root, url
        self.local = is_local(fs)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex(),
                      "since": round(time.time(), 3)}
        self._fd: int | None = None
        self._renewer: threading.Thread | None = None
        self._done = threading.Event()
        self._on_lost = on_lost
        self.lost: str | None = None  # why the lease was lost, once it was
        self._renewed = 0.0  # monotonic time of the last renewal that is known to have landed

    def check(self) -> None:
        """Raises :class:`ExportBusy` once the lease is lost: nothing more may be written."""
        if self.lost is not None:
            raise ExportBusy(self.lost)

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
        elif not self.local and self.lost is None:
            try:
                if self._holder() == self.owner["token"]:
                    self.fs.rm(self.path(LEASE_NAME))
            except Exception:  # noqa: BLE001 - a lease left behind expires after LEASE_S
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
            pid = _flock_holder(os.fstat(fd))
            os.close(fd)
            raise self._busy({"host": socket.gethostname(), "pid": pid or "?", "since": _started(pid)}) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    # object stores: a lease object renewed while the export runs
    def _read_lease(self) -> dict[str, Any] | None:
        raw = read_or_none(self.fs, self.path(LEASE_NAME))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
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
            # Renewed lately, or stamped in the future (the holder's clock ahead of ours): still held.
            if age < LEASE_S:
                raise self._busy(lease, f", renewed {max(age, 0):.0f} s ago")
        self._write_lease()
        time.sleep(min(1.0, RENEW_S / 10))  # two exports that started together: the later write wins ...
        if self._holder() != self.owner["token"]:  # ... and the other one stops here
            raise self._busy(self._read_lease() or {})
        self._renewer = threading.Thread(target=self._renew, name="export-lease", daemon=True)
        self._renewer.start()

    def _write_lease(self) -> None:
        sent = time.monotonic()
        body = {**self.owner, "renewed": round(time.time(), 3)}
        write_atomic(self.fs, self.path(LEASE_NAME), json.dumps(body).encode())
        self._renewed = sent

    def _renew(self) -> None:
        """Every RENEW_S: the lease still ours (else lost), renewed; a renewal that fails is retried,
        until the last one that landed is too old for the lease to be trusted (then lost)."""
        while not self._done.wait(RENEW_S):
            try:
                lease = self._read_lease()
                if lease is None or lease.get("token") != self.owner["token"]:
                    holder = lease or {}
                    return self._lose(f"{self.url}: another export took over the output (host "
                                      f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}); this one stops")
                self._write_lease()
            except Exception:  # noqa: BLE001 - retried at the next renewal while the lease lasts
                if time.monotonic() - self._renewed > LEASE_S - RENEW_S:
                    return self._lose(f"{self.url}: the export's lease could not be renewed for "
                                      f"{LEASE_S - RENEW_S:.0f} s; this one stops")

    def _lose(self, why: str) -> None:
        self.lost = why
        if self._on_lost is not None:
            self._on_lost()


def _flock_holder(st: os.stat_result) -> int | None:
    """The process holding a flock on this file (Linux's /proc/locks: device and inode), if known."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


def _started(pid: int | None) -> float:
    """When process ``pid`` started (seconds since the epoch; Linux's /proc), or 0 when unknown."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
