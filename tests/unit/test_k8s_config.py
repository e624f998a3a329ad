"""deploy/k8s/: the Kubernetes instance (K8sRunLauncher) and executor (k8s_job_executor) configuration,
loaded through Dagster's own config schemas, since no cluster runs where recloop is tested."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml

from recloop.scaleout import K8S_EXECUTOR_YAML, K8S_INSTANCE_YAML, k8s_executor_config


def _instance(tmp_path, data=None):
    """deploy/k8s/dagster.yaml (or `data`) as Dagster loads an instance: the whole file against the
    instance schema, the run launcher's section against K8sRunLauncher's own schema."""
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    if data is None:
        shutil.copy(K8S_INSTANCE_YAML, tmp_path / "dagster.yaml")
    else:
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(data))
    config, _ = dagster_instance_config(str(tmp_path))
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    from dagster._config import convert_potential_field

    return process_config(convert_potential_field(K8sRunLauncher.config_type()).config_type, launcher["config"])


def _executor(config):
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor

    return process_config(k8s_job_executor.config_schema.config_type, config)


def test_k8s_instance_and_executor_pass_dagsters_schemas(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_DAGSTER_PG_URL", "postgresql+psycopg2://dagster:secret@postgres:5432/dagster")
    launcher = _instance(tmp_path)
    assert launcher.success, launcher.errors
    assert launcher.value["instance_config_map"] == "recloop-dagster-instance"
    assert launcher.value["env_secrets"] == ["recloop-secrets"]
    executor = _executor(k8s_executor_config())
    assert executor.success, executor.errors
    assert executor.value["max_concurrent"] >= 1 and "model__ranker" in executor.value["per_step_k8s_config"]


def test_a_wrong_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLOOP_DAGSTER_PG_URL", "postgresql+psycopg2://dagster:secret@postgres:5432/dagster")
    data = yaml.safe_load(K8S_INSTANCE_YAML.read_text())
    bad = copy.deepcopy(data)
    bad["run_launcher"]["config"]["job_namspace"] = bad["run_launcher"]["config"].pop("job_namespace")
    result = _instance(tmp_path, bad)
    assert not result.success and "job_namspace" in str(result.errors)
    bad = copy.deepcopy(data)
    bad["run_monitorng"] = bad.pop("run_monitoring")
    from dagster._core.errors import DagsterInvalidConfigError

    with pytest.raises(DagsterInvalidConfigError, match="run_monitorng"):
        _instance(tmp_path, bad)
    executor = k8s_executor_config()
    executor["max_concurent"] = executor.pop("max_concurrent")
    result = _executor(executor)
    assert not result.success and "max_concurent" in str(result.errors)
    assert K8S_EXECUTOR_YAML.is_file()


def test_the_k8s_executor_is_chosen_by_settings(tmp_path, monkeypatch):
    from pipelines.defs.jobs import executor_for
    from recloop.config import Settings

    monkeypatch.setenv("RECLOOP_HOME", str(tmp_path))
    monkeypatch.setenv("RECLOOP_DAGSTER_EXECUTOR", "k8s")
    executor = executor_for(Settings.from_env())
    assert executor.name == "k8s"
    assert executor.config_schema.resolve_config({}).value["config"]["max_concurrent"] == k8s_executor_config()["max_concurrent"]
