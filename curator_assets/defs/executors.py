"""Which executor runs ``shard_pipeline``: chosen by ``CURATOR_EXECUTOR``.

* unset or ``in_process`` (the default): every step of a run in the run's own process, on the
  embedded instance (``dagster.yaml``: SQLite, no server). Nothing here is imported then.
* ``celery``: dagster-celery; each step is a Celery task on a Redis broker, picked up by workers
  on any machine. The executor config is the ``execution.config`` block of the YAML file named
  by ``CURATOR_CELERY_CONFIG`` (default ``deploy/cluster/celery.yaml``), the same file the workers
  start with (``dagster-celery worker start -y``), so both sides agree on broker and settings.
* ``k8s``: dagster-k8s's ``k8s_job_executor``; each step a Kubernetes Job (``deploy/k8s/``).

Step placement comes from op tags on the assets (``STEP_TAGS``): the decode step goes to the
Celery queue ``gpu`` and asks Kubernetes for a GPU on a GPU node; index and validation stay on
the default queue (``dagster``) with CPU requests. Other executors ignore these tags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

EXECUTOR_ENV = "CURATOR_EXECUTOR"
CELERY_CONFIG_ENV = "CURATOR_CELERY_CONFIG"
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DEFAULT_CELERY_CONFIG = DEPLOY / "cluster" / "celery.yaml"

CELERY_QUEUE_TAG = "dagster-celery/queue"
K8S_CONFIG_TAG = "dagster-k8s/config"
DEFAULT_QUEUE = "dagster"  # dagster_celery's task_default_queue
GPU_QUEUE = "gpu"

GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the label NVIDIA's GPU operator puts on GPU nodes
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _k8s_resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": cpu, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)
    return {"container_config": {"resources": {"requests": requests, "limits": limits}}}


def _decode_k8s_config() -> dict[str, Any]:
    config = _k8s_resources(cpu="4", memory="16Gi", gpus=1)
    config["pod_spec_config"] = {"node_selector": GPU_NODE_SELECTOR, "tolerations": GPU_TOLERATIONS}
    return config


# Op tags per step. Tag values must be strings: the Kubernetes config is JSON, as dagster-k8s reads it.
STEP_TAGS: dict[str, dict[str, str]] = {
    "shard_index": {CELERY_QUEUE_TAG: DEFAULT_QUEUE,
                    K8S_CONFIG_TAG: json.dumps(_k8s_resources(cpu="1", memory="2Gi"))},
    "shard_validation": {CELERY_QUEUE_TAG: DEFAULT_QUEUE,
                         K8S_CONFIG_TAG: json.dumps(_k8s_resources(cpu="1", memory="2Gi"))},
    "decoded_images": {CELERY_QUEUE_TAG: GPU_QUEUE, K8S_CONFIG_TAG: json.dumps(_decode_k8s_config())},
}


def celery_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``execution.config`` block of the Celery YAML (``CURATOR_CELERY_CONFIG`` or the
    repo's ``deploy/cluster/celery.yaml``). Broker and backend stay ``{env: ...}`` references,
    resolved where the run executes: a password in a broker URL is never part of the job."""
    from dagster_shared.yaml_utils import load_yaml_from_path

    path = Path(path or os.environ.get(CELERY_CONFIG_ENV) or DEFAULT_CELERY_CONFIG)
    parsed = load_yaml_from_path(str(path)) or {}
    config = (parsed.get("execution") or {}).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: no execution.config block (the dagster-celery worker config)")
    return config


def celery_executor() -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor as base

    return base.configured(celery_config(), name="celery")


def k8s_executor_config() -> dict[str, Any]:
    """The ``k8s_job_executor`` settings: the namespace (``CURATOR_K8S_NAMESPACE``, default
    ``dagster``) and the ConfigMap and Secret every step pod takes its environment from
    (``deploy/k8s/``: dataset URLs, store credentials)."""
    return {
        "job_namespace": os.environ.get("CURATOR_K8S_NAMESPACE", "dagster"),
        "env_config_maps": ["curator-env"],
        "env_secrets": ["curator-secrets"],
        "step_k8s_config": {"pod_spec_config": {"restart_policy": "Never"}},
    }


def k8s_executor() -> dg.ExecutorDefinition:
    """Each step a Kubernetes Job from the run's image; per-step resources, the GPU request and
    the GPU node selector come from the op tags (``STEP_TAGS``)."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(), name="k8s")


def executor_from_env() -> dg.ExecutorDefinition:
    """The executor ``CURATOR_EXECUTOR`` names (``in_process`` unless set)."""
    kind = os.environ.get(EXECUTOR_ENV, "").strip().lower() or "in_process"
    if kind in ("in_process", "inprocess", "embedded"):
        return dg.in_process_executor
    if kind == "celery":
        return celery_executor()
    if kind in ("k8s", "kubernetes"):
        return k8s_executor()
    raise ValueError(f"{EXECUTOR_ENV}={kind!r}: expected in_process, celery or k8s")
