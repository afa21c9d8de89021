"""Crash containment for decoding: DALI runs in a supervised worker process.

A corrupt image can make DALI (or a codec under it) die with a signal (SIGSEGV, SIGABRT,
SIGBUS), which no ``try`` catches. :class:`ContainedDecoder` has the interface of
:class:`curator_assets.steps.decode.engine.ImageDecoder` (``build``, ``run``, ``builds``) but decodes in a
child process (DALI is imported and built only there; a fork of a process that holds DALI's
threads or a CUDA context is unsafe):

* the worker is never a fork of the caller and never a re-import of the caller's main module
  (which ``multiprocessing``'s spawn would do, and fail on a script without a ``__main__``
  guard): the caller starts one fresh interpreter per process, the *zygote* (``subprocess`` with
  a socket pair), which imports DALI once, starts no thread and touches no CUDA device, and
  forks each worker the caller asks for, handing it its end of a new socket pair (passed over
  the zygote's socket); the zygote reports each worker's pid and exit code back. A worker then
  costs a fork and its own pipeline build, not an interpreter importing DALI (~1.3 s of CPU
  each: two workers competed with the caller for the cores as a run started);
* a batch's encoded bytes go to the worker through a shared-memory buffer of the parent's (one
  copy in, a few MB; the DALI input is built from it without another), the pipe carrying only
  their lengths: sending them through the socket cost ~5% more CPU per image (measured);
* the worker answers with the decoded shapes; when the caller keeps the pixels, the worker
  copies them into one shared-memory file (``/dev/shm``) per batch that the parent maps and
  unlinks at once, so pixels never go through pickle or the pipe;
* when the worker dies, :meth:`ContainedDecoder.run` raises :class:`DecoderCrashed` (a
  :class:`~curator_assets.steps.decode.engine.BatchDecodeFailed`) and the next call starts a fresh worker.
  The shard decoder then replays the batch one record at a time, so the record that kills the
  worker again is failed with ``decoder crashed (signal N)`` and every other record decodes.

* a worker that does not answer within ``DecodeOptions.worker_timeout`` (a codec caught in an
  endless loop) is killed, and :class:`DecoderHung` is raised: the shard decoder replays the
  batch one record at a time as after a crash, and the record that hangs again fails with
  ``decoder hung (no answer in N s)``.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

import curator_assets
from curator_assets.steps.decode.engine import BatchDecodeFailed, ImageDecoder
from curator_assets.steps.decode.options import DecodeOptions, DeviceChoice

# A new worker imports DALI and builds its pipeline before its first answer: seconds on an idle
# machine, tens on a loaded one. This much is allowed on top of the batch timeout.
STARTUP_SECONDS = 120.0
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(curator_assets.__file__)))  # where curator_assets is
# The zygote's start: the collector off while it imports DALI (objects that live as long as it and
# its workers), then frozen out of its sight; a worker turns it on again once its pipeline is built.
_BOOT = ("import gc, sys; gc.disable(); sys.path.insert(0, sys.argv[1]); "
         "from curator_assets.steps.decode.worker import zygote; zygote(int(sys.argv[2]))")
_CALLER: int | None = None  # in a worker: the process it decodes for (its parent is the zygote)
REAP_SECONDS = 0.05  # how often the zygote looks for workers that exited
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class DecoderCrashed(BatchDecodeFailed):
    """The decoder process died (a signal, or an exit) while decoding a batch."""

    crashed = True

    def __init__(self, signum: int | None, exitcode: int | None):
        self.signum = signum
        self.exitcode = exitcode
        super().__init__(crash_reason(signum, exitcode))


class DecoderHung(BatchDecodeFailed):
    """The decoder process gave no answer in time; it has been killed."""

    crashed = True  # like a crash: nothing else may touch the bytes that hung a codec

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(hang_reason(seconds))


def hang_reason(seconds: float) -> str:
    return f"decoder hung (no answer in {seconds:g} s)"


def crash_reason(signum: int | None, exitcode: int | None) -> str:
    """The record's error when the decoder died on it: ``decoder crashed (signal 11): SIGSEGV``."""
    if signum is None:
        return f"decoder crashed (exit status {exitcode})"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"decoder crashed (signal {signum})"
    return f"decoder crashed (signal {signum}): {name}"


# ---------------------------------------------------------------------------------------------
# The worker process


def zygote(fd: int) -> None:
    """The zygote's entry point (a fresh interpreter, started by :func:`_zygote`): import DALI
    once, then fork a worker for each request on ``fd`` and report each worker's pid and, when it
    ends, its exit code (negative: the signal). Importing DALI starts no thread and touches no
    CUDA device, so a fork of this process is safe; each worker then builds its own pipeline.
    Ends when the caller goes (its workers exit as their own pipes close)."""
    from curator_assets.steps.decode.engine import import_dali

    conn = Connection(fd)
    caller = os.getppid()
    import_dali()
    gc.freeze()
    children: set[int] = set()
    try:
        while True:
            if conn.poll(REAP_SECONDS):
                conn.recv()  # a fork request; the worker's end of its socket pair follows
                children.add(_fork_worker(conn, recv_handle(conn), caller))
            _report_exits(conn, children)
    except (EOFError, OSError):
        return


def _fork_worker(conn: Connection, fd: int, caller: int) -> int:
    """Fork a worker serving ``fd``; its pid (sent to the caller)."""
    global _CALLER
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            conn.close()
            _CALLER = caller
            main(fd)
            code = 0
        finally:
            os._exit(code)
    os.close(fd)
    conn.send(("pid", pid))
    return pid


def _report_exits(conn: Connection, children: set[int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            conn.send(("exit", pid, os.waitstatus_to_exitcode(status)))


def _caller_pid() -> int:
    return _CALLER if _CALLER is not None else os.getppid()


def main(fd: int) -> None:
    """The worker's entry point: ``fd`` is its end of the socket pair; the first message is
    ``(device, options)``."""
    conn = Connection(fd)
    try:
        device, options = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, device, options)


def _serve(conn, device: DeviceChoice, options: DecodeOptions) -> None:
    """Build one DALI pipeline, then decode batches until the pipe closes."""
    decoder = ImageDecoder(device, options)
    try:
        decoder.build()
    except Exception as exc:  # noqa: BLE001 - handed to the parent, raised there
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    finally:
        gc.freeze()
        gc.enable()
    conn.send(("ready", decoder.builds))
    serial = 0
    inbuf = None
    while True:
        try:
            lengths, want_pixels, new_input = conn.recv()
        except (EOFError, OSError):  # the parent is gone or closed the pipe
            return
        if new_input is not None:
            inbuf = _open_input(new_input)
        arrays = _split(inbuf, lengths)
        serial += 1
        conn.send(_decode_reply(decoder, arrays, want_pixels, serial))


def _open_input(name: str) -> mmap.mmap:
    """Map the parent's input buffer and unlink its name (both mappings keep it alive)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _split(data, lengths: Sequence[int]) -> list[np.ndarray]:
    buf = np.frombuffer(data, dtype=np.uint8)
    out, pos = [], 0
    for n in lengths:
        out.append(buf[pos : pos + n])
        pos += n
    return out


def _decode_reply(decoder: ImageDecoder, arrays: list[np.ndarray], want_pixels: bool, serial: int) -> tuple:
    try:
        out = decoder.run(arrays)
    except BatchDecodeFailed as exc:
        return ("failed", str(exc), decoder.builds)
    shapes = [tuple(int(d) for d in s) for s in out.shape()]
    if not want_pixels:
        return ("ok", shapes, None, decoder.builds)
    if decoder.device.name == "gpu":
        out = out.as_cpu()
    name = _write_pixels(out, shapes, serial)
    return ("ok", shapes, name, decoder.builds)


def _write_pixels(out, shapes: list[tuple[int, ...]], serial: int) -> str:
    """Copy every image of ``out`` into one new shared-memory file; its name."""
    sizes = [int(np.prod(s)) for s in shapes]
    name = f"curator-decode-{_caller_pid()}-{os.getpid()}-{serial}"  # the parent removes a dead worker's
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(1, sum(sizes)))
        with mmap.mmap(fd, max(1, sum(sizes))) as mm:
            dest = np.frombuffer(mm, dtype=np.uint8)
            pos = 0
            for i, n in enumerate(sizes):
                dest[pos : pos + n] = np.asarray(out[i]).reshape(-1)
                pos += n
            del dest
    finally:
        os.close(fd)
    return name


# ---------------------------------------------------------------------------------------------
# The parent's side


class WorkerOutput:
    """A decoded batch from the worker, read like DALI's output: ``shape()``, ``len``, ``[i]``."""

    def __init__(self, shapes: list[tuple[int, ...]], pixels: list[np.ndarray] | None):
        self._shapes = shapes
        self._pixels = pixels

    def shape(self) -> list[tuple[int, ...]]:
        return self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._pixels is None:
            raise IndexError("the pixels were not asked for")
        return self._pixels[i]


def _map_pixels(name: str, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Views of the images in the worker's shared-memory file, which is unlinked at once (the
    mapping lives as long as a view of it)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    buf = np.frombuffer(mm, dtype=np.uint8)
    views, pos = [], 0
    for s in shapes:
        n = int(np.prod(s))
        views.append(buf[pos : pos + n].reshape(s))
        pos += n
    return views


class ContainedDecoder:
    """An :class:`~curator_assets.steps.decode.engine.ImageDecoder` whose DALI pipeline lives in a worker
    process that is restarted when it dies. ``keep_pixels``: bring the decoded pixels back
    (through shared memory); otherwise only their shapes come back."""

    def __init__(self, device: DeviceChoice, options: DecodeOptions, keep_pixels: bool = True):
        self.device = device
        self.options = options
        self.keep_pixels = keep_pixels
        self._builds_before = 0  # pipelines built by the workers that are gone
        self._builds_now = 0  # pipelines built by the current worker
        self.restarts = 0  # workers started after one died
        self._process = None
        self._conn = None
        self.key: tuple | None = None  # what the running worker was started with (see _wanted)
        self._input: mmap.mmap | None = None  # the encoded bytes of the batch, shared with the worker
        self._inputs = 0
        self._lock = threading.Lock()
        self._aborted = False  # abort(): the caller is being interrupted; calls fail until resume()

    def build(self) -> None:
        """Start the worker and wait until its pipeline is built (nothing to do while it runs); a
        build failure raises RuntimeError with DALI's message (as an in-process build would)."""
        if self.alive or self._adopt():
            return
        process, parent = _start_worker()
        try:
            parent.send((self.device, self.options))
            if not parent.poll(STARTUP_SECONDS + self.options.worker_timeout):
                _stop(process)
                parent.close()
                raise DecoderHung(STARTUP_SECONDS + self.options.worker_timeout)
            reply = parent.recv()
        except (EOFError, OSError):
            parent.close()
            process.wait()
            raise DecoderCrashed(*_death(process.returncode)) from None
        if reply[0] != "ready":
            parent.close()
            process.wait()
            raise RuntimeError(reply[1])
        self._process, self._conn, self.key, self._input = process, parent, self._wanted(), None
        self._builds_before += self._builds_now
        self._builds_now = reply[1]

    @property
    def builds(self) -> int:
        """DALI pipelines built in all the workers so far (a failed batch rebuilds one)."""
        return self._builds_before + self._builds_now

    def run(self, arrays: Sequence[np.ndarray], keep_pixels: bool | None = None) -> WorkerOutput:
        """Decode in the worker; raises :class:`BatchDecodeFailed` when DALI fails the batch and
        :class:`DecoderCrashed` when the worker dies on it."""
        want = self.keep_pixels if keep_pixels is None else keep_pixels
        with self._lock:
            if self._aborted:
                raise BatchDecodeFailed("decoder aborted: the caller was interrupted")
            if self._conn is None:
                self.build()
            new_input = self._fill_input(arrays)
            try:
                self._conn.send(([len(a) for a in arrays], want, new_input))
                if not self._conn.poll(self.options.worker_timeout):
                    raise self._hung()
                reply = self._conn.recv()
            except (EOFError, OSError):
                raise self._died() from None
        return self._output(reply)

    def _fill_input(self, arrays: Sequence[np.ndarray]) -> str | None:
        """Copy the encoded images into the input buffer (a bigger new one when they do not fit:
        its name, for the worker to map; None when the current one is used)."""
        total = sum(len(a) for a in arrays)
        name = None
        if self._input is None or len(self._input) < total:
            self._inputs += 1
            name = f"curator-decode-{os.getpid()}-{self._process.pid}-in{self._inputs}"
            self._input = _new_input(name, max(total, 1 << 20) * 2)
        dest = np.frombuffer(self._input, dtype=np.uint8)
        pos = 0
        for a in arrays:
            dest[pos : pos + len(a)] = a
            pos += len(a)
        return name

    def _output(self, reply: tuple) -> WorkerOutput:
        self._builds_now = reply[-1]
        if reply[0] == "failed":
            raise BatchDecodeFailed(reply[1])
        _, shapes, name, _ = reply
        pixels = _map_pixels(name, shapes) if name is not None else None
        return WorkerOutput(shapes, pixels)

    def _died(self) -> DecoderCrashed:
        """The worker is gone: reap it, remove what it left in shared memory, and say how it died."""
        process, conn = self._process, self._conn
        self._process = self._conn = self._input = None
        conn.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # alive but its pipe broke: make sure it is gone
            process.kill()
            process.wait()
        _remove_leftovers(process.pid)
        self.restarts += 1
        return DecoderCrashed(*_death(process.returncode))

    def _hung(self) -> DecoderHung:
        """The worker gave no answer in time: kill it (its batch is lost) and clean up after it."""
        process, conn = self._process, self._conn
        self._process = self._conn = self._input = None
        _stop(process)
        conn.close()
        _remove_leftovers(process.pid)
        self.restarts += 1
        return DecoderHung(self.options.worker_timeout)

    def abort(self) -> None:
        """From any thread, while another may be waiting on this worker: kill the worker now, so
        a caller that is being interrupted (a terminated run) does not wait up to
        ``worker_timeout`` for a batch nobody will read. Later calls fail at once until
        :meth:`resume`; the batch in flight fails as a crash (the killed worker is reaped)."""
        self._aborted = True
        process = self._process
        if process is not None:
            process.kill()

    def resume(self) -> None:
        """Usable again after :meth:`abort`: the next call starts a fresh worker."""
        self._aborted = False

    def close(self) -> None:
        """Stop the worker (it also exits by itself when this process goes)."""
        with self._lock:
            if self._conn is None:
                return
            process, conn = self._process, self._conn
            self._process = self._conn = self._input = None
            _remove_leftovers(process.pid)
            conn.close()  # the worker sees the pipe close and returns
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __del__(self) -> None:
        # A decoder dropped without close(): closing the pipe makes its worker exit.
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

    def _adopt(self) -> bool:
        """Take over the process of an idle worker with the same options, if there is one."""
        idle = _take_idle(self._wanted())
        if idle is None:
            return False
        self._process, self._conn, self.key = idle._process, idle._conn, idle.key
        self._input, self._inputs = idle._input, idle._inputs
        idle._process = idle._conn = idle._input = None
        self._builds_before += self._builds_now
        self._builds_now = idle._builds_now
        return True

    @property
    def alive(self) -> bool:
        return self._conn is not None and self._process.poll() is None

    def _wanted(self) -> tuple:
        """What makes two workers interchangeable."""
        return self.device, self.options

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


# Starting a worker costs seconds (a fresh interpreter importing DALI, then a pipeline build):
# the workers of a closed shard decoder wait here for the next one with the same options.
MAX_IDLE = 4
_IDLE: list[ContainedDecoder] = []
_IDLE_LOCK = threading.RLock()  # re-entrant: a decoder collected by the GC releases its workers


def _take_idle(key: tuple) -> ContainedDecoder | None:
    with _IDLE_LOCK:
        for n, worker in enumerate(_IDLE):
            if worker.key == key and worker.alive:
                return _IDLE.pop(n)
    return None


def release(worker: ContainedDecoder) -> None:
    """Keep a running worker for the next decoder (the oldest idle one stops beyond MAX_IDLE)."""
    if not worker.alive:
        return
    with _IDLE_LOCK:
        _IDLE.append(worker)
        extra = _IDLE[:-MAX_IDLE] if len(_IDLE) > MAX_IDLE else []
        del _IDLE[: len(extra)]
    for old in extra:
        old.close()


class _Zygote:
    """The caller's side of its zygote: requests forks, and learns the workers' pids and exit
    codes from a reader thread."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _BOOT, _ROOT, str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.owner = os.getpid()
        self._conn = Connection(ours.detach())
        self._send = threading.Lock()
        self._changed = threading.Condition()
        self._pids: list[int] = []  # pids in the order of the requests, taken by fork()
        self._exits: dict[int, int] = {}
        self.gone = False
        threading.Thread(target=self._read, daemon=True, name="decode-zygote").start()

    def _read(self) -> None:
        while True:
            try:
                kind, pid, *code = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._changed:
                if kind == "pid":
                    self._pids.append(pid)
                else:
                    self._exits[pid] = code[0]
                self._changed.notify_all()
        with self._changed:
            self.gone = True
            self._changed.notify_all()

    def fork(self, fd: int) -> ForkedWorker:
        with self._send:
            self._conn.send("fork")
            send_handle(self._conn, fd, self.process.pid)
            with self._changed:
                # The zygote imports DALI before it answers its first request.
                if not self._changed.wait_for(lambda: self._pids or self.gone, STARTUP_SECONDS):
                    raise OSError("the decoder zygote did not answer")
                if not self._pids:
                    raise OSError("the decoder zygote is gone")
                return ForkedWorker(self, self._pids.pop(0))

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s exit code once it has ended (None: still running after ``timeout``). A worker
        of a zygote that died is followed through /proc; its code is then unknown (255)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while pid not in self._exits:
                if self.gone and not os.path.exists(f"/proc/{pid}"):
                    return 255
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._changed.wait(min(left, 0.2) if left is not None else 0.2)
            return self._exits[pid]


class ForkedWorker:
    """A decode worker forked by the zygote, with what the supervisor uses of
    :class:`subprocess.Popen` (``pid``, ``poll``, ``wait``, ``kill``, ``returncode``)."""

    def __init__(self, zygote: _Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"decode worker {self.pid}", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_ZYGOTE: _Zygote | None = None
_ZYGOTE_LOCK = threading.Lock()


def _zygote() -> _Zygote:
    """This process's zygote, started on first use (and again if it has died): one import of DALI
    for all the workers it forks, where each worker used to import it (~1.3 s of CPU each)."""
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        z = _ZYGOTE
        if z is None or z.owner != os.getpid() or z.gone or z.process.poll() is not None:
            _ZYGOTE = z = _Zygote()
        return z


def _start_worker() -> tuple[ForkedWorker, Connection]:
    """A worker forked by this process's zygote, and the parent's end of its socket pair."""
    for attempt in (1, 2):
        ours, theirs = socket.socketpair()
        try:
            return _zygote().fork(theirs.fileno()), Connection(ours.detach())
        except (EOFError, OSError):
            ours.close()
            if attempt == 2:
                raise
        finally:
            theirs.close()
    raise AssertionError("unreachable")


def _stop(process: ForkedWorker) -> None:
    """Kill a worker that does not answer and reap it."""
    process.kill()
    process.wait()


def _new_input(name: str, size: int) -> mmap.mmap:
    """A new shared-memory file of ``size`` bytes, mapped; the worker unlinks it once mapped."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _death(exitcode: int | None) -> tuple[int | None, int | None]:
    """(signal, exit status) of a dead worker from its exit code (negative: the signal)."""
    if exitcode is not None and exitcode < 0:
        return -exitcode, None
    return None, exitcode


def _remove_leftovers(pid: int) -> None:
    """Shared-memory files of a worker that died while writing one."""
    suffix = f"-{pid}-"
    prefix = f"curator-decode-{os.getpid()}{suffix}"
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


__all__: list[Any] = ["ContainedDecoder", "DecoderCrashed", "WorkerOutput", "release", "crash_reason",
                      "DecoderHung", "hang_reason"]
