"""The code location ``curator_assets``: what ``dg dev``, ``dg check defs``, workspace.yaml, the warm
run launcher and ``curator-assets run`` load.

The assets, checks, jobs, sensors and schedules are found in ``curator_assets/defs/`` the way ``dg``
finds them (``dg.load_from_defs_folder``, the project's ``[tool.dg.project]``); the resources and
the default executor are added here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import dagster as dg

from curator_assets.defs import assets, automation, checks, export_assets, jobs, schedules, sensors
from curator_assets.defs.resources import ShardStorage, storage_from_env

PACKAGE_ROOT = Path(__file__).resolve().parent


def _has_project_config() -> bool:
    """Whether the package sits in its dg project (a checkout or an editable install), whose
    pyproject.toml names the defs folder; a wheel installed into site-packages has none."""
    pyproject = PACKAGE_ROOT.parent / "pyproject.toml"
    return pyproject.is_file() and "[tool.dg.project]" in pyproject.read_text(encoding="utf-8")


def defs_folder() -> dg.Definitions:
    """Every definition in ``curator_assets/defs/``."""
    if _has_project_config():
        return dg.load_from_defs_folder(path_within_project=PACKAGE_ROOT.parent)
    # Installed as a wheel: the same modules, loaded by name.
    return dg.Definitions(
        assets=dg.load_assets_from_modules([assets, export_assets]),
        asset_checks=dg.load_asset_checks_from_modules([checks]),
        jobs=[jobs.shard_pipeline],
        sensors=[sensors.shard_sensor, automation.dataset_automation_sensor],
        schedules=[schedules.catch_up_schedule],
    )


def build_definitions(storage: ShardStorage | None = None) -> dg.Definitions:
    return dg.Definitions.merge(
        defs_folder(),
        dg.Definitions(
            resources={"storage": storage or storage_from_env()},
            # The executor of jobs that set none: the runs that materialize the dataset summaries
            # (the automation sensor's, the UI's). Dagster's default (multiprocess) starts a fresh
            # interpreter per step, seconds of imports for a step of well under a second; in process
            # the steps run in the run worker.
            executor=dg.in_process_executor,
        ),
    )


@functools.cache
def _environment_definitions() -> dg.Definitions:
    # Built once per process: a run forked from the warm launcher's server finds them built.
    return build_definitions()


@dg.definitions
def defs() -> dg.Definitions:
    """The code location, with the storage the environment configures (CURATOR_DATASET_URL, ...)."""
    return _environment_definitions()
