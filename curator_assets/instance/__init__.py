"""The single-machine Dagster instance's accelerators, and the guard in front of them.

Two accelerators make runs on one machine cheaper: a run launcher that forks runs from a warm
process (``launcher.py``, ``warm_preload.py``) and SQLite storage with connections kept open
(``sqlite_storage.py``). Both build on Dagster internals (``dagster._*``), so they are used only on
the Dagster versions they were tested on (``TESTED``). On any other version, or with
``CURATOR_RUN_LAUNCHER=default``, the instance uses Dagster's own run launcher and SQLite storage
(same files, tables and schema), and the process that launches runs says so in one log line.

The classes ``dagster.yaml`` names are here (public Dagster API only), plus the storage class in
``sqlite_storage.py``; nothing outside this package imports ``dagster._*``::

    run_coordinator: {module: curator_assets.instance, class: RunCoordinator}
    run_launcher:    {module: curator_assets.instance, class: RunLauncher}
    storage: {custom: {module: curator_assets.instance.sqlite_storage, class: InstanceStorage}}
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import dagster as dg

logger = logging.getLogger("curator_assets.instance")

# Dagster minor versions the accelerators were tested on (every release of each).
TESTED = ("1.12", "1.13")
SWITCH_ENV = "CURATOR_RUN_LAUNCHER"  # "default": Dagster's own launcher and storage
DEFAULT_MODULES = ("curator_assets.definitions",)
DEFAULT_PRELOAD = ("curator_assets.instance.warm_preload",)

_said = threading.Event()


def minor_version(version: str) -> str:
    return ".".join(version.split(".")[:2])


def running_version() -> str:
    return dg.__version__


def fallback_reason(version: str | None = None) -> str | None:
    """Why the accelerators are off in this process (``None``: they are on)."""
    version = version or running_version()
    if os.environ.get(SWITCH_ENV, "").strip().lower() == "default":
        return f"{SWITCH_ENV}=default"
    if minor_version(version) not in TESTED:
        return f"Dagster {version} is not a tested version ({', '.join(v + '.x' for v in TESTED)})"
    return None


def accelerated(say: bool = True) -> bool:
    """Whether to use the warm launcher and the pooled storage; when not and ``say``, log why
    (once per process). The run launcher says it: it is built where runs are launched (the
    daemon), not in every code server and run worker that opens the instance."""
    reason = fallback_reason()
    if reason is not None and say and not _said.is_set():
        _said.set()
        logger.warning("curator_assets.instance: %s: using Dagster's own run launcher and storage", reason)
    return reason is None


class RunLauncher(dg.DefaultRunLauncher):
    """The instance's run launcher: the warm launcher (``launcher.WarmRunLauncher``) when
    ``accelerated()``, else Dagster's :class:`DefaultRunLauncher`."""

    @classmethod
    def config_type(cls) -> dict:
        return {
            "modules": dg.Field(dg.Array(str), is_required=False, default_value=list(DEFAULT_MODULES),
                                description="Code location modules whose runs are forked warm."),
            "preload": dg.Field(dg.Array(str), is_required=False, default_value=list(DEFAULT_PRELOAD),
                                description="Modules the fork server imports before its first fork."),
        }

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> Any:
        if accelerated():
            from curator_assets.instance.launcher import WarmRunLauncher

            return WarmRunLauncher(inst_data=inst_data, **config_value)
        return dg.DefaultRunLauncher(inst_data=inst_data)


class RunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's queued run coordinator; on the accelerated path it also starts the warm run
    server as the daemon starts.

    The daemon builds the run coordinator as it starts (to know which daemons to run) but the
    run launcher only at the first launch; warming up from here lets the fork server's imports
    overlap the code server's start-up and the first sensor tick instead of delaying the first
    run by them."""

    def register_instance(self, instance: dg.DagsterInstance) -> None:
        super().register_instance(instance)
        if fallback_reason() is None:
            from curator_assets.instance.launcher import launches_runs

            if launches_runs():
                threading.Thread(target=_warm_up_launcher, args=(weakref.ref(instance),), daemon=True,
                                 name="warm-run-server").start()


def _warm_up_launcher(instance_ref: weakref.ref) -> None:
    # The instance registers its run coordinator while it is being built: let it finish first.
    time.sleep(0.2)
    instance = instance_ref()
    try:
        launcher = instance.run_launcher if instance is not None else None
        warm_up = getattr(launcher, "warm_up", None)
        if warm_up is not None:
            warm_up()
    except Exception:  # noqa: BLE001 - the first launch warms up (or reports the error) itself
        logger.warning("cannot start the warm run server early", exc_info=True)
