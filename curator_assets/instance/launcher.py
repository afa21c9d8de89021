"""A run launcher that starts each run from a warm process instead of a fresh interpreter.

Dagster's default launcher asks the code server to start a run, and the code server spawns a
fresh interpreter per run, which imports Dagster, the project and later DALI before the first
step: 5-9 s per run on a 2-core machine (``benchmarks/bench_pipeline.py``). This launcher keeps
a ``multiprocessing`` fork server in the process that launches runs (the daemon) that has
imported all of that once (``curator_assets.instance.warm_preload``), and forks each run worker from it.

The run worker then does what Dagster's own worker (``dagster api execute_run``) does: it loads
the instance from its ref, reconstructs the job from the run's code origin and executes it, so
the run's events, status, failures and step logs are the same. The launcher also:

* falls back to Dagster's :class:`DefaultRunLauncher` for runs of any other code location, and
  for every run when ``CURATOR_RUN_LAUNCHER=default`` is set;
* terminates a run (UI terminate) with SIGINT, as the code server does: Dagster turns it into
  an orderly cancel;
* watches each worker it forked and fails the run when the worker dies without ending it
  (a SIGKILL, the OOM killer), as the code server does, and answers run monitoring's worker
  health check from the worker's pid, which also covers runs started by an earlier daemon;
* restarts the fork server when the project's source files change, so a run never executes
  code older than what the code location shows.

The repo's ``dagster.yaml`` selects it through ``curator_assets.instance.RunLauncher``, which
builds it only on the Dagster versions it was tested on (see ``curator_assets/instance``)::

    run_launcher:
      module: curator_assets.instance
      class: RunLauncher
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster._check as check
from dagster import DagsterInstance, DagsterRun, DefaultRunLauncher
from dagster._core.events import EngineEventData
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.origin import JobPythonOrigin
from dagster._serdes import ConfigurableClass, deserialize_value, serialize_value
from dagster._serdes.config_class import ConfigurableClassData
from dagster._utils import get_run_crash_explanation

from curator_assets.instance import DEFAULT_MODULES, DEFAULT_PRELOAD
from curator_assets.instance import SWITCH_ENV as FALLBACK_ENV

logger = logging.getLogger(__name__)

LAUNCHER_TAG = "curator/run_launcher"
WORKER_PID_TAG = "curator/run_worker_pid"
SERVER_PID_TAG = "curator/fork_server_pid"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def source_version(root: Path = PROJECT_ROOT) -> tuple[int, int]:
    """Newest modification time and count of the project's ``.py`` files: a cheap stand-in for
    "the code the fork server imported is still the code on disk" (~30 stat calls)."""
    times = [p.stat().st_mtime_ns for p in root.rglob("*.py")]
    return (max(times, default=0), len(times))


def _process_state(pid: int) -> str | None:
    """The ``/proc`` state letter of ``pid`` (``Z`` for a zombie), ``None`` when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def worker_alive(pid: int) -> bool:
    """Whether ``pid`` is still a live run worker of a fork server (not a zombie, and not a pid
    the kernel has reused for something else since)."""
    if _process_state(pid) in (None, "Z", "X"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing.forkserver" in cmdline


class _WarmServer:
    """The process's ``multiprocessing`` fork server (there is one per process, so this state is
    module-level): its preload list, and the project version it imported."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version: tuple[int, int] | None = None

    def context(self, preload: Sequence[str]) -> multiprocessing.context.BaseContext:
        """The fork server context (call with ``lock`` held), restarted first when the project's
        code has changed since the server imported it (the next fork then starts a fresh one)."""
        ctx = multiprocessing.get_context("forkserver")
        version = source_version()
        if self.version is not None and version != self.version:
            logger.info("project code changed: restarting the warm run server")
            multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
        if version != self.version:
            ctx.set_forkserver_preload(list(preload))
            self.version = version
        return ctx

    @staticmethod
    def pid() -> int | None:
        return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


_SERVER = _WarmServer()


def launches_runs() -> bool:
    """Whether this process is the one that launches queued runs (``dagster-daemon run``, also
    under ``dagster dev``); the webserver and the CLI build the launcher too, but only submit."""
    if multiprocessing.parent_process() is not None:
        # A process multiprocessing started (a run worker forked by the warm server) carries its
        # parent's sys.argv, the daemon's: it launches nothing, and must not start a fork server of
        # its own (a second server importing Dagster, the project and DALI: ~3 s of CPU per run).
        return False
    main = Path(sys.argv[0] if sys.argv else "")
    return (main.name == "dagster-daemon" or main.parent.name == "_daemon"  # `python -m dagster._daemon`
            or os.environ.get("CURATOR_WARM_EAGER") == "1")


def run_worker(run_id: str, instance_ref: str, working_directory: str | None) -> None:
    """The body of a forked run worker: execute ``run_id`` as ``dagster api execute_run`` does."""
    from dagster._core.instance import InstanceRef
    from dagster._utils.interrupts import capture_interrupts

    if working_directory:
        # What the code server does for its location: relative paths and imports resolve there.
        os.chdir(working_directory)
        if working_directory not in sys.path:
            sys.path.insert(0, working_directory)
    with capture_interrupts():
        with DagsterInstance.from_ref(deserialize_value(instance_ref, InstanceRef)) as instance:
            _execute(run_id, instance)


def _execute(run_id: str, instance: DagsterInstance) -> None:
    from dagster._grpc.impl import core_execute_run
    from dagster._utils.hosted_user_process import recon_job_from_origin

    run = check.not_none(instance.get_run_by_id(run_id), f"run {run_id} not found")
    recon_job = recon_job_from_origin(check.not_none(run.job_code_origin))
    pid = os.getpid()
    data = EngineEventData.in_process(pid)
    data = EngineEventData(metadata={**data.metadata, "fork_server_pid": str(os.getppid())})
    instance.report_engine_event(f"Started process for run (pid: {pid}).", run, data)
    try:
        for _event in core_execute_run(recon_job, run, instance, inject_env_vars=True):
            pass
    except Exception:  # noqa: BLE001 - core_execute_run has written the failure to the event log
        logger.debug("run %s raised", run_id, exc_info=True)
    finally:
        instance.report_engine_event(f"Process for run exited (pid: {pid}).", run)


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Forks each run of this project's code location from a warm fork server (see the module)."""

    def __init__(self, inst_data: ConfigurableClassData | None = None, modules: Sequence[str] = DEFAULT_MODULES,
                 preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self._inst_data = inst_data
        self._modules = tuple(modules)
        self._preload = tuple(preload)
        self._default = DefaultRunLauncher()
        self._lock = threading.Lock()
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        from dagster import Array, Field

        return {
            "modules": Field(Array(str), is_required=False, default_value=list(DEFAULT_MODULES),
                             description="Code location modules whose runs are forked warm."),
            "preload": Field(Array(str), is_required=False, default_value=list(DEFAULT_PRELOAD),
                             description="Modules the fork server imports before its first fork."),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance: DagsterInstance) -> None:
        super().register_instance(instance)
        self._default.register_instance(instance)

    def warm_up(self) -> None:
        """Start the fork server (and its preload) if it is not running."""
        if os.environ.get(FALLBACK_ENV, "").lower() == "default":
            return
        with _SERVER.lock:
            _SERVER.context(self._preload)
            multiprocessing.forkserver.ensure_running()

    # -- launching ---------------------------------------------------------------------------

    def serves(self, run: DagsterRun) -> bool:
        """Whether ``run`` is forked warm: a run of a served module, loaded by this interpreter
        (another virtual environment's code location goes through its own code server)."""
        if os.environ.get(FALLBACK_ENV, "").lower() == "default":
            return False
        origin = run.job_code_origin
        if origin is None:
            return False
        repository = origin.repository_origin
        module = getattr(repository.code_pointer, "module", None)
        return module in self._modules and repository.executable_path == sys.executable

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if not self.serves(run):
            self._default.launch_run(context)
            return
        origin: JobPythonOrigin = check.not_none(run.job_code_origin)
        working_directory = getattr(origin.repository_origin.code_pointer, "working_directory", None)
        ref = serialize_value(self._instance.get_ref())
        with _SERVER.lock:
            ctx = _SERVER.context(self._preload)
            process = ctx.Process(target=run_worker, args=(run.run_id, ref, working_directory),
                                  name=f"dagster-run-{run.run_id[:8]}")
            process.start()
            server_pid = _SERVER.pid()
        # Not a child multiprocessing waits for at exit: a daemon that stops leaves its runs
        # running, as the code server does.
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        with self._lock:
            self._workers[run.run_id] = process
        self._instance.add_run_tags(run.run_id, {LAUNCHER_TAG: "warm", WORKER_PID_TAG: str(process.pid),
                                                 SERVER_PID_TAG: str(server_pid)})
        threading.Thread(target=self._watch, args=(run.run_id, process), daemon=True,
                         name=f"watch-run-{run.run_id[:8]}").start()

    # -- watching ----------------------------------------------------------------------------

    def _watch(self, run_id: str, process: multiprocessing.process.BaseProcess) -> None:
        """Wait for the worker to exit; if the run is not over then, the worker died (a signal, a
        crash in native code): report it and fail the run, as the code server does."""
        process.join()
        code = process.exitcode
        while code == 255 and worker_alive(process.pid or 0):
            # 255 also means the fork server that reports exit codes went away (restarted, or
            # the daemon is stopping): the worker itself may be running still.
            time.sleep(1.0)
        with self._lock:
            self._workers.pop(run_id, None)
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return
        message = get_run_crash_explanation(f"Run execution process for {run_id}", check.not_none(code))
        self._instance.report_engine_event(message, run, cls=self.__class__)
        self._instance.report_run_failed(run)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = run.tags.get(WORKER_PID_TAG)
        if run.tags.get(LAUNCHER_TAG) != "warm" or not pid:
            # Started by the code server, which watches its own workers.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "not a warm run worker")
        if worker_alive(int(pid)):
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=pid)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker pid {pid} is gone", run_worker_id=pid)

    # -- terminating -------------------------------------------------------------------------

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        if run.tags.get(LAUNCHER_TAG) != "warm":
            return self._default.terminate(run_id)
        self._instance.report_run_canceling(run)
        pid = int(run.tags.get(WORKER_PID_TAG, "0"))
        if not pid or not worker_alive(pid):
            self._instance.report_engine_event(f"Run worker pid {pid} not found to terminate.", run,
                                               cls=self.__class__)
            return False
        # Dagster's run worker turns SIGINT into an orderly cancel (the code server's way too).
        os.kill(pid, signal.SIGINT)
        return True

    def join(self, timeout: int = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if not self._workers:
                    break
            time.sleep(0.05)
        self._default.join(max(0, int(deadline - time.time())))

    def dispose(self) -> None:
        self._default.dispose()
