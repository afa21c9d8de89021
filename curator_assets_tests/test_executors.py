"""Executor selection (CURATOR_EXECUTOR), the Celery config, and the Kubernetes deployment on
paper (no cluster here): the Job specs dagster-k8s's own construction functions build for each
step of ``shard_pipeline`` from the executor config and the step's tags, checked against what
Kubernetes must be told (literal values, not the project's constants) and validated, with the
deploy/k8s objects, against the Kubernetes API schemas (kubernetes-validate)."""

from __future__ import annotations

import pytest

from curator_assets.defs.executors import k8s_executor, k8s_executor_config

RUN_ID = "0123abcd-0000-4000-8000-000000000000"


def _job_def():
    from curator_assets.definitions import build_definitions
    from curator_assets.defs.resources import storage_from_env

    return build_definitions(storage_from_env("/data/shards")).resolve_job_def("shard_pipeline")


def _executor_context(config: dict):
    """The K8sContainerContext that k8s_job_executor makes of its (validated) config."""
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    processed = process_config(k8s_job_executor.config_schema.config_type, config)
    assert processed.success, processed.errors
    cfg = processed.value
    return K8sContainerContext(
        env_config_maps=cfg.get("env_config_maps"), env_secrets=cfg.get("env_secrets"),
        namespace=cfg.get("job_namespace"),
        run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(cfg.get("step_k8s_config", {})),
    )


def step_job_object(step_key: str):
    """The Kubernetes Job (a kubernetes client V1Job) for one step of shard_pipeline."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_k8s_job_name,
        get_user_defined_k8s_config,
    )

    tags = dict(_job_def().graph.node_named(step_key).tags)
    context = _executor_context(k8s_executor_config()).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    job_config = DagsterK8sJobConfig(job_image="registry.example/curator-assets:1", dagster_home="/opt/dagster/home",
                                     instance_config_map="dagster-instance")
    job = construct_dagster_k8s_job(
        job_config, args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{get_k8s_job_name(RUN_ID, step_key)}", component="step_worker",
        user_defined_k8s_config=context.run_k8s_config, labels={"dagster/op": step_key},
        env_vars=[{"name": "DAGSTER_RUN_STEP_KEY", "value": step_key}],
    )
    return job


def step_job(step_key: str) -> dict:
    return step_job_object(step_key).to_dict()


def k8s_validate(obj: dict) -> None:
    """Validate against the Kubernetes API schema of the newest version kubernetes-validate ships;
    strict: an unknown field is an error too."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {exc}") from None


def test_the_k8s_executor_is_selected_and_its_config_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from curator_assets.defs.executors import executor_from_env

    monkeypatch.setenv("CURATOR_EXECUTOR", "k8s")
    assert executor_from_env().name == "k8s"
    assert k8s_executor().name == "k8s"
    assert _executor_context(k8s_executor_config()).namespace == "dagster"
    monkeypatch.delenv("CURATOR_EXECUTOR")
    assert executor_from_env().name == "in_process"  # the default stays embedded


def test_decode_step_asks_for_a_gpu_on_a_gpu_node() -> None:
    pod = step_job("decoded_images")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}  # the GPU operator's node label
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in [
        {k: v for k, v in t.items() if v is not None} for t in pod["tolerations"]]
    assert pod["restart_policy"] == "Never"
    # The environment (dataset URLs, store credentials) from the ConfigMap and the Secret.
    assert [(s["config_map_ref"] or {}).get("name") for s in container["env_from"]] == ["curator-env", None]
    assert [(s["secret_ref"] or {}).get("name") for s in container["env_from"]] == [None, "curator-secrets"]
    assert container["image"] == "registry.example/curator-assets:1"


@pytest.mark.parametrize("step_key", ["shard_index", "shard_validation"])
def test_cpu_steps_ask_for_no_gpu_and_go_anywhere(step_key: str) -> None:
    pod = step_job(step_key)["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]
    assert resources["requests"]["cpu"] == "1"
    assert not pod.get("node_selector")
    assert not pod.get("tolerations")


@pytest.mark.parametrize("step_key", ["shard_index", "shard_validation", "decoded_images"])
def test_step_jobs_are_valid_kubernetes_jobs(step_key: str) -> None:
    from kubernetes.client import ApiClient

    k8s_validate(ApiClient().sanitize_for_serialization(step_job_object(step_key)))  # the JSON sent to the API


def test_k8s_validation_catches_a_bad_job() -> None:
    """The validator is no rubber stamp: a GPU count as a number, and an unknown field, fail."""
    from kubernetes.client import ApiClient

    job = ApiClient().sanitize_for_serialization(step_job_object("decoded_images"))
    container = job["spec"]["template"]["spec"]["containers"][0]
    for bad in ({**container, "resources": {"limits": {"nvidia.com/gpu": [1]}}}, {**container, "gpus": "1"}):
        job["spec"]["template"]["spec"]["containers"][0] = bad
        with pytest.raises(AssertionError):
            k8s_validate(job)


def test_deploy_files_are_valid_kubernetes() -> None:
    """deploy/k8s/curator-env.yaml object by object, and the Kubernetes parts of the Helm values
    (the run pod's resources) inside a Pod. The chart's own values schema is not checked here."""
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
    docs = list(yaml.safe_load_all((deploy / "curator-env.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Secret"]
    for doc in docs:
        k8s_validate(doc)
    values = yaml.safe_load((deploy / "values.yaml").read_text())
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "run"},
           "spec": {"containers": [{"name": "run", "image": "x", "resources": launcher["resources"]}]}}
    k8s_validate(pod)


def test_deploy_files_name_what_the_executor_reads() -> None:
    """The ConfigMap and Secret of deploy/k8s are the ones the step pods take their environment
    from, and the Helm values select the k8s executor."""
    from pathlib import Path

    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
    objects = {d["kind"]: d["metadata"]["name"] for d in yaml.safe_load_all((deploy / "curator-env.yaml").read_text())}
    config = k8s_executor_config()
    assert objects == {"ConfigMap": config["env_config_maps"][0], "Secret": config["env_secrets"][0]}
    values = yaml.safe_load((deploy / "values.yaml").read_text())
    env = values["dagster-user-deployments"]["deployments"][0]["env"]
    assert {"name": "CURATOR_EXECUTOR", "value": "k8s"} in env
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def test_celery_config_is_read_from_the_shared_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """CURATOR_EXECUTOR=celery takes the executor config from the workers' YAML; broker and
    backend stay environment references; an unknown executor name is an error."""
    from dagster._config import process_config
    from dagster_celery import celery_executor as base

    from curator_assets.defs.executors import celery_config, executor_from_env

    config = celery_config()
    assert config["broker"] == {"env": "CURATOR_CELERY_BROKER"}
    assert config["backend"] == {"env": "CURATOR_CELERY_BACKEND"}
    monkeypatch.setenv("CURATOR_CELERY_BROKER", "redis://:pw@host:6379/0")
    monkeypatch.setenv("CURATOR_CELERY_BACKEND", "redis://:pw@host:6379/1")
    processed = process_config(base.config_schema.config_type, config)
    assert processed.success, processed.errors
    assert processed.value["config_source"]["task_acks_late"] is True
    monkeypatch.setenv("CURATOR_EXECUTOR", "celery")
    assert executor_from_env().name == "celery"
    (tmp_path / "bad.yaml").write_text("broker: x\n")
    with pytest.raises(ValueError, match="execution.config"):
        celery_config(tmp_path / "bad.yaml")
    monkeypatch.setenv("CURATOR_EXECUTOR", "dask")
    with pytest.raises(ValueError, match="in_process, celery or k8s"):
        executor_from_env()
