"""What the warm run launcher's fork server imports once, so every run forked from it starts warm.

``multiprocessing``'s fork server imports the modules it is told to preload, by name, before it
forks its first child; this module is one of them. Importing it imports Dagster's execution
machinery, the project's definitions (and resolves every job once, so the repository is built
in the server rather than in each run) and DALI's Python package.

Nothing here may start a Python thread, open the instance or touch CUDA: a fork copies one thread and
every lock as it was, and a CUDA context does not survive a fork. ``nvidia.dali`` is only
imported (its libraries loaded); the first pipeline, and the first CUDA call
(``cuda_device_count``), happen in the run. (Two native threads do exist: numpy's OpenBLAS
pool and Arrow's jemalloc background thread; both libraries make themselves fork-safe with
``pthread_atfork`` handlers.)
"""

from __future__ import annotations

import gc
import importlib
import logging

logger = logging.getLogger(__name__)

# Imported by every run before its first step (``python -X importtime`` of a run worker):
# Dagster's run execution path and the libraries the shard assets use.
MODULES = (
    "dagster",
    "dagster._cli.api",
    "dagster._grpc.impl",
    "dagster._core.execution.api",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.event_log.sqlite.sqlite_event_log",
    "dagster._utils.hosted_user_process",
    "pyarrow.parquet",
    "PIL.Image",
    "curator_assets.steps.decode.shard",
    "curator_assets.steps.decode.worker",
    "curator_assets.instance.launcher",
    "nvidia.dali",
)

# The code location served warm; every job is resolved here once.
DEFINITIONS_MODULE = "curator_assets.definitions"


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a missing optional library only means a colder start
        logger.debug("warm preload: cannot import %s", name, exc_info=True)


def _resolve_jobs() -> None:
    try:
        definitions = importlib.import_module(DEFINITIONS_MODULE)
        repository = definitions.defs().get_repository_def()
        for job_name in repository.job_names:
            repository.get_job(job_name)
    except Exception:  # noqa: BLE001 - the run reports the same error itself, with its context
        logger.debug("warm preload: cannot resolve %s", DEFINITIONS_MODULE, exc_info=True)


def _first_arrow_array() -> None:
    """pyarrow's first conversion of a Python list imports pandas when it is installed (~0.5 s
    here, paid by every run's first manifest otherwise). No thread is started by it."""
    try:
        import pyarrow

        pyarrow.array([0])
    except Exception:  # noqa: BLE001 - only a colder start
        logger.debug("warm preload: pyarrow conversion failed", exc_info=True)


def warm() -> None:
    for name in MODULES:
        _import(name)
    _first_arrow_array()
    _resolve_jobs()
    # What was imported lives as long as every forked run: out of the garbage collector's sight,
    # a run's collections do not walk it (and do not touch, so copy, the pages it shares with
    # the server).
    gc.freeze()


warm()
