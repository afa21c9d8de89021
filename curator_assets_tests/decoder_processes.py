"""Finding the decoder processes of this machine from /proc, and holding them with SIGSTOP.

A caller that decodes with crash containment starts one *zygote* (a Python process running
``curator_assets.steps.decode.worker.zygote``) whose children are the decode workers. Freezing those
workers holds every decode of the caller where it is, with nothing switched on in the package;
SIGCONT lets them go on as if nothing happened.
"""

from __future__ import annotations

import os
import signal
import threading

ZYGOTE_MARK = b"curator_assets.steps.decode.worker import zygote"


def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    out[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _below(parents: dict[int, int], roots: set[int]) -> set[int]:
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {p for p, q in parents.items() if q in frontier} - found
        found |= frontier
    return found


def decode_workers(roots: set[int]) -> dict[int, int]:
    """The decode workers under the processes ``roots`` (other decoders on the machine are none
    of a test's business): worker pid -> the pid of the process it decodes for."""
    parents = _parents()
    below = _below(parents, roots)
    zygotes = {pid: parents[pid] for pid in below if ZYGOTE_MARK in _cmdline(pid)}
    return {pid: zygotes[parent] for pid, parent in parents.items() if parent in zygotes}


class DecoderFreezer:
    """While it runs, every decode worker that appears under the processes ``roots`` is stopped
    with SIGSTOP (checked every 0.05 s); :meth:`release` stops watching and continues them all."""

    def __init__(self, roots: set[int]) -> None:
        self.roots = set(roots)
        self.frozen: dict[int, int] = {}  # worker pid -> the process it decodes for
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="decoder-freezer")

    def __enter__(self) -> DecoderFreezer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def callers(self) -> set[int]:
        """The processes whose decode workers are held."""
        with self._lock:
            return set(self.frozen.values())

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for pid, caller in decode_workers(self.roots).items():
                with self._lock:
                    if pid in self.frozen or self._stop.is_set():
                        continue
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except ProcessLookupError:
                        continue
                    self.frozen[pid] = caller

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            for pid in self.frozen:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
