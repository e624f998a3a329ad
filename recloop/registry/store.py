"""The model registry discipline: log a training run, register its bundle, gate, promote, refuse, roll back.

One registered version = one model *bundle* (two-tower retrieval model, FAISS index, ranker), logged as a
single MLflow pyfunc model from code (`recloop/bundle_model.py`), so the three parts are promoted and
rolled back together. Stages are not used; three aliases say where a version stands:

* `challenger`: the candidate registered by the training cycle in progress, from its registration until
  the decision (the promotion gate, the latency gate, then promotion or refusal); a candidate that passed
  the gates but waits for another version's online experiment to end keeps it.
* `experiment`: the candidate under an online experiment against the champion (serving splits traffic);
  removed when the experiment ends.
* `champion`: the version serving follows; moved by a promotion (or an experiment's) and by a rollback.

Every promotion decision is written twice: as a few tags on the model version (its current state: the
decision, its summary and reasons, the bar, the primary metric of both) and as one run in the MLflow
experiment `recloop-promotions` (the log, with every number the decision looked at). `history()` and
`rollback()` read that log, so the champion lineage can be rebuilt from MLflow alone. A bundle is logged only if it matches the
checksums it was saved with, and `verify()` checks a version the same way (download, checksums, load):
`rollback()` skips earlier champions that fail it, `rollback(to=...)` refuses one.

The embedded store (SQLite, artifacts beside it in RECLOOP_HOME) is relocatable: `rehome_artifacts`
re-roots the absolute artifact locations MLflow keeps when a home was copied or moved.

The gate (`GateConfig`, `decide`) is pure logic over metric dicts, in `recloop.registry.gate`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

from recloop.registry.gate import GateDecision
from recloop.registry.names import (
    CHAMPION,
    CHALLENGER,
    EXPERIMENT,
    PROMOTIONS_EXPERIMENT,
    MODEL_ARTIFACT_NAME,
    BUNDLE_ARTIFACT,
    BUNDLE_MODEL_CODE,
    RUNTIME_PACKAGES,
    DECISION_PROMOTED,
    DECISION_REFUSED,
    DECISION_ROLLED_BACK,
    DECISION_EXPERIMENT_STARTED,
    DECISION_EXPERIMENT_STOPPED,
    ONLINE_EXPERIMENTS,
    EXPERIMENT_KIND_TAG,
    ML_EXPERIMENT_KIND,
    NOTE_TAG,
    MONITORING_EXPERIMENT,
    EXPERIMENT_DESCRIPTIONS,
    RegistryError,
    _DECISION_WORDS,
    _MAX_PARAM_VALUE,
    _MAX_TAG_VALUE,
    _TAG,
)
from recloop.registry.relocation import rehome_artifacts


def default_pip_requirements() -> list[str]:
    """Explicit, resolvable pins of the serving dependencies (e.g. `torch==2.13.0`, not `2.13.0+cpu`)."""
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{package}=={version.split('+', 1)[0]}")
    return pins


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_TAG_VALUE else text[: _MAX_TAG_VALUE - 3] + "..."


def data_range(data: Mapping[str, Any]) -> str | None:
    """`"<first>..<last>"` partition range of a training data description, if it has one.

    Understood keys: `partition_start`/`partition_end`, `start`/`end`, or a `partitions` list.
    """
    for lo, hi in (("partition_start", "partition_end"), ("start", "end")):
        if data.get(lo) is not None and data.get(hi) is not None:
            return f"{data[lo]}..{data[hi]}"
    partitions = data.get("partitions")
    if isinstance(partitions, Sequence) and not isinstance(partitions, str) and partitions:
        ordered = sorted(str(p) for p in partitions)
        return f"{ordered[0]}..{ordered[-1]}"
    return None


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds")


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


BUNDLE_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "k", required=False)]),
    outputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "rank"), ColSpec("string", "video_id")]),
)


class Registry:
    """Thin, typed wrapper around `mlflow.MlflowClient` (and the fluent API where MLflow needs it).

    Args:
        tracking_uri: MLflow tracking (and registry) URI, e.g. `sqlite:///.../mlflow.db` or `http://...`.
        model_name: the registered model's name.
        artifact_location: root for artifacts of experiments this class creates (a local folder URI or
            `s3://...`); None lets the store decide.
        run_tags: tags for every run this instance creates (training, drift, decision, online runs): the
            orchestrator's run, `dagster.run_id` and `dagster.run_url` (`recloop.links.dagster_run_tags`).

    Every experiment it creates is tagged as a machine-learning one (`mlflow.experimentKind =
    custom_model_development`, with a description), and so is an existing one that lacks the tag.
    """

    def __init__(self, tracking_uri: str, model_name: str, artifact_location: str | None = None,
                 run_tags: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_location = artifact_location.rstrip("/") if artifact_location else None
        self.run_tags = {str(k): str(v) for k, v in (run_tags or {}).items()}
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            if self.artifact_location and self.artifact_location.startswith("file://"):
                rehome_artifacts(db, self.artifact_location)
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def __repr__(self) -> str:
        return f"Registry({self.tracking_uri!r}, {self.model_name!r})"

    # ---- plumbing --------------------------------------------------------------------------------

    @contextmanager
    def _fluent(self) -> Iterator[None]:
        """Point MLflow's global (fluent) API at this registry for the duration, then restore it exactly.

        `mlflow.set_tracking_uri`/`set_registry_uri` also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI,
        and `get_registry_uri()` falls back to the tracking URI, so "get then set back" would leave the
        registry pinned to this store: the raw previous values and environment are restored instead.
        Not thread-safe (MLflow's fluent state is process-global).
        """
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved_tracking = tracking_utils._tracking_uri
        saved_registry = registry_utils._registry_uri
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]  # None = unset
            registry_utils._registry_uri = saved_registry
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created if missing; tagged as an ML experiment (MLflow 3's UI otherwise
        treats it as a GenAI one) with a description, an existing one too if it lacks the tag."""
        tags = {EXPERIMENT_KIND_TAG: ML_EXPERIMENT_KIND}
        if name in EXPERIMENT_DESCRIPTIONS:
            tags[NOTE_TAG] = EXPERIMENT_DESCRIPTIONS[name]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # created before recloop tagged them
                for key, value in tags.items():
                    if key not in (experiment.tags or {}):
                        self.client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
        location = f"{self.artifact_location}/{name}" if self.artifact_location else None
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            created = self.client.get_experiment_by_name(name)  # created concurrently
            if created is None:
                raise
            return created.experiment_id

    def _version(self, alias_or_version: str | int) -> ModelVersion:
        ref = str(alias_or_version)
        try:
            if ref.isdigit():
                return self.client.get_model_version(self.model_name, ref)
            return self.client.get_model_version_by_alias(self.model_name, ref)
        except MlflowException as err:
            raise RegistryError(f"{self.model_name} has no version or alias {ref!r}: {err.message}") from err

    def _alias(self, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    # ---- logging and registering -----------------------------------------------------------------

    def log_training_run(
        self,
        *,
        experiment: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        data: Mapping[str, Any],
        features: Sequence[str],
        bundle_dir: Path,
        tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
        pip_requirements: Sequence[str] | None = None,
        example_user_ids: Sequence[str] = ("0",),
        curves: Mapping[str, Sequence[float]] | None = None,
        artifacts: Mapping[str, Any] | None = None,
        datasets: Sequence[tuple[Any, str]] = (),
        description: str | None = None,
    ) -> str:
        """Log one training run: params, metrics, the data it saw, its features and the bundle as ONE model.

        Args:
            experiment: experiment name (created if missing).
            params: configs, nested dicts flattened with dots (`retrieval.dim`).
            metrics: training and offline evaluation metrics (`eval.full.ndcg_at_10`); nested dicts are
                flattened with dots; None values are skipped.
            data: partition range (`partition_start`, `partition_end`), row counts, validation results;
                logged as `data.*` params, a `recloop.data_range` tag and the artifact `data.json`.
            features: feature names, logged as `features.json`.
            bundle_dir: the bundle directory written by `recloop.model_plane.bundle.save_bundle`.
            tags: extra run tags.
            run_name: optional MLflow run name.
            pip_requirements: overrides `default_pip_requirements()`.
            example_user_ids: users of the input example MLflow validates the model with while logging.
            curves: per-step series (training losses per epoch, the ranker's NDCG per boosting round),
                logged as metrics with their step, so MLflow plots them.
            artifacts: further JSON documents to attach (name -> content), e.g. the fit report.
            datasets: (`mlflow.data` dataset, context) pairs logged as the run's inputs, e.g. the training
                window with context `training` (MLflow keeps their name, source, digest, schema, profile).
            description: the run's description (markdown) in the MLflow UI.
        The registry's `run_tags` (the orchestrator's run) are added to the run's tags.
        Returns:
            The run id.
        """
        bundle_dir = Path(bundle_dir)
        if not bundle_dir.is_dir():
            raise RegistryError(f"bundle directory {bundle_dir} does not exist")
        from recloop.model_plane.bundle import CHECKSUMS, verify_bundle, write_checksums

        # What is logged is what was saved: a bundle damaged since is refused here, not found at serving.
        if (bundle_dir / CHECKSUMS).is_file():
            verify_bundle(bundle_dir)
        else:  # a bundle written without checksums (by hand, by an older recloop): checksummed as it is
            write_checksums(bundle_dir)
        flat_params = {k: _param_value(v) for k, v in _flatten(params).items()}
        flat_data = {f"data.{k}": _param_value(v) for k, v in _flatten(data).items()}
        clash = set(flat_params) & set(flat_data)
        if clash:
            raise RegistryError(f"params clash with data params: {sorted(clash)}")
        flat_metrics = {k: float(v) for k, v in _flatten(metrics).items() if v is not None}
        run_tags = {f"{_TAG}kind": "training", f"{_TAG}features.count": str(len(features)), **self.run_tags,
                    **(tags or {})}
        if (span := data_range(data)) is not None:
            run_tags[f"{_TAG}data_range"] = span
        if description:
            run_tags[NOTE_TAG] = description

        import pandas as pd

        experiment_id = self._experiment_id(experiment)
        with self._fluent():
            nested = mlflow.active_run() is not None
            with mlflow.start_run(
                experiment_id=experiment_id, run_name=run_name, tags=run_tags, nested=nested
            ) as run:
                mlflow.log_params({**flat_params, **flat_data})
                if flat_metrics:
                    mlflow.log_metrics(flat_metrics)
                if datasets:
                    mlflow.log_inputs(datasets=[d for d, _ in datasets], contexts=[c for _, c in datasets],
                                      tags_list=[None] * len(datasets))
                if curves:
                    from mlflow.entities import Metric

                    now = int(time.time() * 1000)
                    points = [Metric(name, float(v), now, step) for name, series in curves.items()
                              for step, v in enumerate(series) if v is not None and math.isfinite(float(v))]
                    client = mlflow.tracking.MlflowClient()
                    for start in range(0, len(points), 1000):
                        client.log_batch(run.info.run_id, metrics=points[start : start + 1000], synchronous=True)
                for name, content in (artifacts or {}).items():
                    mlflow.log_dict(json.loads(json.dumps(content, default=str)), name)
                mlflow.log_dict(json.loads(json.dumps(dict(data), default=str)), "data.json")
                mlflow.log_text(json.dumps(list(features), indent=1), "features.json")
                mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT_NAME,
                    python_model=str(BUNDLE_MODEL_CODE),
                    artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                    pip_requirements=list(pip_requirements or default_pip_requirements()),
                    signature=BUNDLE_SIGNATURE,
                    input_example=pd.DataFrame({"user_id": [str(u) for u in example_user_ids], "k": 10}),
                )
                return run.info.run_id

    def log_drift_report(
        self,
        *,
        partition: str,
        model_version: str | int,
        drifted: bool,
        summary: Mapping[str, float],
        report_uri: str,
        report_html: str | None = None,
        reasons: Sequence[str] = (),
        experiment: str = MONITORING_EXPERIMENT,
    ) -> str:
        """Log one partition's drift report as a run of the monitoring experiment, linked both ways: the
        run carries the champion's version and the report's lake URI (and the HTML as an artifact), and
        the champion's version gets a `recloop.last_drift_run` tag. Returns the run id."""
        experiment_id = self._experiment_id(experiment)
        tags = {**self.run_tags, f"{_TAG}kind": "drift", f"{_TAG}partition": partition,
                f"{_TAG}model_version": str(model_version), f"{_TAG}drifted": str(bool(drifted)).lower(),
                f"{_TAG}report_uri": report_uri, f"{_TAG}reasons": _tag_value("; ".join(reasons))}
        if reasons:
            tags[NOTE_TAG] = _tag_value("\n".join(f"- {r}" for r in reasons))
        run = self.client.create_run(experiment_id, run_name=f"drift {partition} v{model_version}", tags=tags)
        run_id = run.info.run_id
        metrics = [Metric(k, float(v), _ms(_now()), 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if report_html is not None:
            self.client.log_text(run_id, report_html, "drift_report.html")
        self.client.set_terminated(run_id)
        self.client.set_model_version_tag(self.model_name, str(model_version), f"{_TAG}last_drift_run", run_id)
        return run_id

    def _logged_model_id(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        candidates = [
            (output.step, output.model_id)
            for output in outputs
            if self.client.get_logged_model(output.model_id).name == MODEL_ARTIFACT_NAME
        ]
        if not candidates:
            raise RegistryError(f"run {run_id} has no logged model named {MODEL_ARTIFACT_NAME!r}")
        return max(candidates)[1]

    def register(self, run_id: str, *, description: str | None = None) -> str:
        """Register the run's bundle model (`runs:/<run_id>/model`) as a new version; return the version.

        The version's tags are kept to what a decision needs (docs/model_plane.md, "In MLflow"): the
        source run (`recloop.run_id`), its training window (`recloop.data_range`) and the Dagster run that
        trained it (`dagster.run_url`); the metrics stay on the run (`version_metrics` reads them).
        `description` is the version's description (default: which run's bundle it is).
        """
        # In MLflow 3 the model lives under models/<model_id>, not in the run's artifacts; registering the
        # logged model directly is what `mlflow.register_model("runs:/<run_id>/model")` falls back to.
        model_id = self._logged_model_id(run_id)
        try:
            self.client.create_registered_model(
                self.model_name, description="recloop bundle: two-tower retrieval + FAISS index + ranker"
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        from recloop.links import DAGSTER_RUN_URL_TAG

        run = self.client.get_run(run_id)
        tags = {f"{_TAG}run_id": run_id}
        for key in (f"{_TAG}data_range", DAGSTER_RUN_URL_TAG):
            if (value := run.data.tags.get(key)) is not None:
                tags[key] = value
        # The SQL registry store resolves `models:/<model_id>` with a *global* MlflowClient(), whatever
        # this client's URI: point the fluent API here while it does.
        with self._fluent():
            version = self.client.create_model_version(
                self.model_name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=tags,
                model_id=model_id,
                description=description or f"bundle of run {run.info.run_name or run_id} ({run_id})",
            )
        return str(version.version)

    def rename_run(self, run_id: str, name: str) -> None:
        """Give the run a new name (e.g. the version it was registered as, once known)."""
        self.client.update_run(run_id, name=name)

    def run_url(self, run_id: str | None, *, artifact: str | None = None) -> str | None:
        """The run's page in the MLflow UI (`recloop.links.mlflow_run_url`; with `artifact`, that artifact's
        view), None when there is no run or the tracking store does not know it."""
        from recloop.links import mlflow_run_url

        experiment_id = self.run_experiment(run_id)
        return mlflow_run_url(experiment_id, run_id, artifact=artifact) if experiment_id else None

    def run_experiment(self, run_id: str | None) -> str | None:
        """The id of the experiment the run belongs to; None when there is no run or the store does not know it."""
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id).info.experiment_id
        except MlflowException:
            return None

    def version_links(self, version: str | int) -> dict[str, str]:
        """The version's source run and the MLflow UI pages of the run and the version."""
        from recloop.links import mlflow_model_version_url

        mv = self._version(version)
        out = {"mlflow_version_url": mlflow_model_version_url(self.model_name, mv.version)}
        if mv.run_id and (url := self.run_url(mv.run_id)):
            out.update(mlflow_run_id=mv.run_id, mlflow_run_url=url)
        return out

    def set_challenger(self, version: str | int) -> None:
        self._version(version)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, str(version))

    def champion(self) -> ModelVersion | None:
        """The version the `champion` alias points at, or None."""
        return self._alias(CHAMPION)

    def challenger(self) -> ModelVersion | None:
        return self._alias(CHALLENGER)

    def experiment(self) -> ModelVersion | None:
        """The version the `experiment` alias points at (under an online experiment), or None."""
        return self._alias(EXPERIMENT)

    def version_metrics(self, alias_or_version: str | int, *, prefix: str = "eval.full.") -> dict[str, float]:
        """The version's run metrics under `prefix`, prefix stripped: the flat dict `decide()` takes."""
        mv = self._version(alias_or_version)
        if not mv.run_id:
            return {}
        metrics = self.client.get_run(mv.run_id).data.metrics
        return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}

    def model_uri(self, alias_or_version: str | int) -> str:
        ref = str(alias_or_version)
        return f"models:/{self.model_name}/{ref}" if ref.isdigit() else f"models:/{self.model_name}@{ref}"

    def load(self, alias_or_version: str | int = CHAMPION) -> PyFuncModel:
        """The pyfunc model (`models:/<name>@<alias>` or `models:/<name>/<version>`)."""
        self._version(alias_or_version)
        with self._fluent():
            return mlflow.pyfunc.load_model(self.model_uri(alias_or_version))

    def bundle_path(self, alias_or_version: str | int = CHAMPION, *, dst_dir: Path | None = None) -> Path:
        """Download the version's model and return its bundle directory, for `recloop.model_plane.bundle.load_bundle`.

        The alias is resolved to a version first, so the files are those of one fixed version.
        """
        mv = self._version(alias_or_version)
        prefix = f"recloop-{self.model_name}-v{mv.version}-"
        dst = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix=prefix))
        dst.mkdir(parents=True, exist_ok=True)
        with self._fluent():
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.model_name}/{mv.version}", dst_path=str(dst)
                )
            )
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        relative = mlmodel["flavors"]["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
        return local / relative

    # ---- promotion, refusal, history, rollback ---------------------------------------------------

    def _log_decision(
        self,
        *,
        when: datetime,
        version: str,
        decision: str,
        compared_to: str,
        reasons: list[str],
        metrics: Mapping[str, float],
        extra_params: Mapping[str, str] | None = None,
    ) -> str:
        experiment_id = self._experiment_id(PROMOTIONS_EXPERIMENT)
        seq = max((entry["seq"] for entry in self._log_entries(experiment_id)), default=0) + 1
        run = self.client.create_run(
            experiment_id,
            start_time=_ms(when),
            run_name=_decision_run_name(decision, version, extra_params or {}),
            tags={
                **self.run_tags,
                f"{_TAG}seq": str(seq),
                f"{_TAG}model_name": self.model_name,
                f"{_TAG}reasons": _tag_value(reasons),
                f"{_TAG}decided_at": _iso(when),
                NOTE_TAG: _tag_value("\n".join(f"- {r}" for r in reasons)),
            },
        )
        params = {
            "version": version,
            "decision": decision,
            "compared_to": compared_to,
            **(extra_params or {}),
        }
        self.client.log_batch(
            run.info.run_id,
            metrics=[
                Metric(key, float(value), _ms(when), 0)
                for key, value in metrics.items()
                if value is not None and math.isfinite(float(value))
            ],
            params=[Param(key, _param_value(value)) for key, value in params.items()],
        )
        self.client.set_terminated(run.info.run_id, end_time=_ms(when))
        return run.info.run_id

    def _log_entries(self, experiment_id: str | None = None) -> list[dict[str, Any]]:
        """Decisions for this model, oldest first."""
        if experiment_id is None:
            experiment = self.client.get_experiment_by_name(PROMOTIONS_EXPERIMENT)
            if experiment is None:
                return []
            experiment_id = experiment.experiment_id
        entries, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{_TAG}model_name` = '{self.model_name}'",
                max_results=1000,
                page_token=token,
            )
            for run in page:
                params, tags = run.data.params, run.data.tags
                entries.append(
                    {
                        "seq": int(tags.get(f"{_TAG}seq", 0)),
                        "when": datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC),
                        "version": params.get("version"),
                        "decision": params.get("decision"),
                        "compared_to": params.get("compared_to"),
                        "from_version": params.get("from_version"),
                        "to_version": params.get("to_version"),
                        "why": json.loads(tags.get(f"{_TAG}reasons", "[]")),
                        "metrics": dict(run.data.metrics),
                        "run_id": run.info.run_id,
                    }
                )
            token = page.token
            if not token:
                break
        entries.sort(key=lambda e: (e["seq"], e["when"]))
        return entries

    def _tag_version(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, _tag_value(value))

    def _decision_tags(self, decision_name: str, when: datetime, decision: GateDecision) -> dict[str, str]:
        """The decision's essentials on the version: what, when, the one-line summary and every reason, the
        bar, and the primary metric of the challenger and of the bar (the other numbers are on the
        decision's run in `recloop-promotions`)."""
        tags = {
            f"{_TAG}decision": decision_name,
            f"{_TAG}decided_at": _iso(when),
            f"{_TAG}summary": _tag_value(decision.reasons[0] if decision.reasons else decision_name),
            f"{_TAG}reasons": _tag_value(decision.reasons),
            f"{_TAG}compared_to": decision.compared_to,
        }
        bar = "champion" if decision.compared_to.startswith("champion") else "popularity"
        for role in ("challenger", bar):
            key = f"{role}.{decision.primary_metric}"
            if key in decision.metrics:
                tags[f"{_TAG}gate.{key}"] = f"{decision.metrics[key]:.6g}"
        return tags

    def promote(self, version: str | int, decision: GateDecision, *, unloadable: Sequence[str] = ()) -> None:
        """Move `champion` to `version` (clearing `challenger` if it pointed there) and record why.

        `unloadable`: champion versions the evaluation could not load (corrupt); the decision's bar is
        then the newest champion of the lineage not among them, or popularity when there is none.

        Raises RegistryError if the decision refuses, if the version is already champion, or if the
        decision was made against another champion than the current one (a stale decision).
        """
        version = str(version)
        self._version(version)
        if not decision.promote:
            raise RegistryError(f"the gate refused version {version}; use refuse(): {decision.reasons[0]}")
        current = self.champion()
        if current is not None and str(current.version) == version:
            raise RegistryError(f"version {version} is already the champion")
        expected = "popularity" if current is None else f"champion:{current.version}"
        if current is not None and str(current.version) in set(map(str, unloadable)):
            loadable = [v for v in reversed(self.lineage()) if v not in set(map(str, unloadable))]
            expected = f"champion:{loadable[0]}" if loadable else "popularity"
        if decision.compared_to != expected:
            raise RegistryError(
                f"stale decision: it compared version {version} with {decision.compared_to}, "
                f"but the bar is now {expected}; decide again"
            )
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
        self._record(version, DECISION_PROMOTED, decision,
                     extra_params={"from_version": str(current.version) if current else "none"})

    def refuse(self, version: str | int, decision: GateDecision) -> None:
        """Keep the champion; tag `version` refused and record why.

        A `challenger` alias pointing at the refused version is cleared.
        """
        version = str(version)
        self._version(version)
        self._record(version, DECISION_REFUSED, decision)

    def _record(
        self, version: str, outcome: str, decision: GateDecision, *, extra_params: dict[str, str] | None = None
    ) -> None:
        """A decided version is no longer the challenger; tag it and log the decision (when, why, metrics)."""
        when = _now()
        challenger = self.challenger()
        if challenger is not None and str(challenger.version) == version:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        self._tag_version(version, self._decision_tags(outcome, when, decision))
        self._log_decision(
            when=when,
            version=version,
            decision=outcome,
            compared_to=decision.compared_to,
            reasons=decision.reasons,
            metrics=decision.metrics,
            extra_params=extra_params,
        )

    def apply(self, version: str | int, decision: GateDecision) -> bool:
        """`promote` or `refuse` as the decision says; returns whether the version became champion."""
        (self.promote if decision.promote else self.refuse)(version, decision)
        return decision.promote

    def history(self) -> list[dict[str, Any]]:
        """Every decision for this model, newest first: when, version, decision, why, metrics, ..."""
        return [{k: v for k, v in e.items() if k != "seq"} for e in reversed(self._log_entries())]

    def lineage(self) -> list[str]:
        """Champion versions from the promotion log, oldest first; the last is the current champion."""
        stack: list[str] = []
        for entry in self._log_entries():
            if entry["decision"] == DECISION_PROMOTED:
                stack.append(entry["version"])
            elif entry["decision"] == DECISION_ROLLED_BACK and stack:
                _roll_back(stack, entry.get("to_version"))
        return stack

    def promoted_versions(self) -> list[str]:
        """Every version the gate ever promoted (champion at some time), in order of first promotion."""
        seen: list[str] = []
        for entry in self._log_entries():
            if entry["decision"] == DECISION_PROMOTED and entry["version"] not in seen:
                seen.append(entry["version"])
        return seen

    def verify(self, alias_or_version: str | int) -> None:
        """Download the version's bundle (to a temporary folder, removed after), check every file against
        the checksums it was saved with and load it with the bundle loader
        (`recloop.bundle_model.resolve_loader`). Raises `recloop.model_plane.bundle.CorruptModelError`
        naming the damaged file (or the loader's error when the files match but cannot be loaded),
        RegistryError for an unknown version."""
        from recloop.bundle_model import resolve_loader
        from recloop.model_plane.bundle import verify_bundle

        with tempfile.TemporaryDirectory(prefix="recloop-verify-") as tmp:
            bundle = self.bundle_path(alias_or_version, dst_dir=Path(tmp))
            verify_bundle(bundle)
            resolve_loader()(str(bundle))

    def rollback(
        self,
        *,
        to: str | int | None = None,
        reason: str | None = None,
        check: Callable[[str], Any] | None = None,
    ) -> tuple[str, str]:
        """Move `champion` back to an earlier champion; return (from_version, to_version).

        Without `to`, the newest champion before the current one in the lineage that passes `check`
        (versions that do not, e.g. corrupt ones, are skipped and named in the record). With `to`, that
        version: it must exist, have been promoted by the gate at some time, not be the champion now, and
        pass `check`. `check(version)` raises when the version cannot serve; the default downloads,
        verifies the checksums and loads the bundle (`verify`).

        Raises RegistryError, with a sentence saying why and what to do, if there is no champion, if the
        alias no longer matches the promotion log (it was moved outside this class), or if no version
        can be rolled back to.
        """
        check = check or self.verify
        current = self.champion()
        if current is None:
            raise RegistryError(f"{self.model_name} has no champion to roll back")
        stack = self.lineage()
        if not stack or stack[-1] != str(current.version):
            raise RegistryError(
                f"champion alias points at version {current.version} but the promotion log says "
                f"{stack[-1] if stack else 'none'}; it was moved outside recloop, fix it by hand"
            )
        from_version = stack[-1]
        skipped: list[str] = []
        if to is not None:
            to_version = str(to).strip().removeprefix("v")
            self._version(to_version)  # exists
            promoted = self.promoted_versions()
            if to_version == from_version:
                raise RegistryError(f"version {to_version} is the champion already: nothing to roll back")
            if to_version not in promoted:
                raise RegistryError(
                    f"version {to_version} of {self.model_name} was never champion, so it cannot be rolled back "
                    f"to (only a version the gate promoted can be); promoted versions: {', '.join(promoted)}"
                )
            try:
                check(to_version)
            except RegistryError:
                raise
            except Exception as err:  # noqa: BLE001 - corrupt or unloadable: said in one sentence
                raise RegistryError(f"version {to_version} cannot be rolled back to because it does not load: "
                                    f"{_one_line(err)}; pick another with --to (recloop models lists them)") from err
        else:
            earlier = list(dict.fromkeys(reversed(stack[:-1])))
            if not earlier:
                raise RegistryError(
                    f"no previous champion to roll back to: version {current.version} is the first champion "
                    f"of {self.model_name} still in the lineage; train a new one (recloop train) or name a "
                    f"version with --to"
                )
            to_version = ""
            for version in earlier:
                try:
                    check(version)
                except Exception as err:  # noqa: BLE001 - skipped, and said so
                    skipped.append(f"version {version} skipped: {_one_line(err)}")
                    continue
                to_version = version
                break
            if not to_version:
                raise RegistryError(
                    f"no previous champion of {self.model_name} loads ({'; '.join(skipped)}); train a new one "
                    f"(recloop train)"
                )
        when = _now()
        why = [f"rolled back champion from version {from_version} to version {to_version}", *skipped]
        if reason:
            why.append(reason)
        self.client.set_registered_model_alias(self.model_name, CHAMPION, to_version)
        self._tag_version(
            from_version,
            {
                f"{_TAG}decision": DECISION_ROLLED_BACK,
                f"{_TAG}decided_at": _iso(when),
                f"{_TAG}reasons": _tag_value(why),
            },
        )
        self._tag_version(to_version, {f"{_TAG}restored_at": _iso(when)})
        self._log_decision(
            when=when,
            version=from_version,
            decision=DECISION_ROLLED_BACK,
            compared_to=f"champion:{from_version}",
            reasons=why,
            metrics={},
            extra_params={"from_version": from_version, "to_version": to_version},
        )
        return from_version, to_version

    # ---- online experiments (recloop.online) -----------------------------------------------------

    def start_experiment(self, version: str | int, decision: GateDecision) -> str:
        """Put `version`, which passed the gate against the current champion, under the `experiment`
        alias (serving splits traffic between `champion` and `experiment`) and record it like a gate
        decision (tags on the version, a run in `recloop-promotions`). Returns the experiment id,
        f"exp-v{champion}-v{version}".

        Raises RegistryError when the gate refused the version, when there is no champion (the first
        model is promoted directly), when the version is the champion, when the decision was made against
        another champion (stale), or when another version's experiment is still running."""
        version = str(version)
        self._version(version)
        if not decision.promote:
            raise RegistryError(f"the gate refused version {version}; use refuse(): {decision.reasons[0]}")
        current = self.champion()
        if current is None:
            raise RegistryError(f"{self.model_name} has no champion to experiment against: promote the first "
                                "model directly")
        if str(current.version) == version:
            raise RegistryError(f"version {version} is already the champion")
        if decision.compared_to != f"champion:{current.version}":
            raise RegistryError(f"stale decision: it compared version {version} with {decision.compared_to}, but "
                                f"the champion is now version {current.version}; decide again")
        running = self.experiment_info()
        if running is not None:
            if running["version"] == version:
                return running["experiment_id"]
            raise RegistryError(f"the online experiment {running['experiment_id']} is still running; version "
                                f"{version} waits until it ends (recloop.online decides daily)")
        experiment_id = f"exp-v{current.version}-v{version}"
        when = _now()
        self.client.set_registered_model_alias(self.model_name, EXPERIMENT, version)
        self._record(version, DECISION_EXPERIMENT_STARTED, decision,
                     extra_params={"experiment_id": experiment_id, "champion_version": str(current.version)})
        self._tag_version(version, {f"{_TAG}experiment_id": experiment_id,
                                    f"{_TAG}experiment_started_at": _iso(when),
                                    f"{_TAG}experiment_champion": str(current.version)})
        return experiment_id

    def experiment_info(self) -> dict[str, Any] | None:
        """The running online experiment: version, experiment_id, champion_version, started_at (UTC
        datetime); None when the `experiment` alias is unset."""
        mv = self.experiment()
        if mv is None:
            return None
        tags = dict(mv.tags or {})
        started = tags.get(f"{_TAG}experiment_started_at")
        champion = tags.get(f"{_TAG}experiment_champion", "")
        return {
            "version": str(mv.version),
            "experiment_id": tags.get(f"{_TAG}experiment_id") or f"exp-v{champion}-v{mv.version}",
            "champion_version": champion,
            "started_at": datetime.fromisoformat(started) if started
            else datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
        }

    def end_experiment(
        self,
        *,
        promote: bool,
        outcome: str,
        reasons: Sequence[str],
        metrics: Mapping[str, float],
        primary_metric: str = "online",
    ) -> str:
        """End the running online experiment and record the decision; returns the experiment's version.

        `promote=True`: `champion` moves to the experiment's version and the decision is recorded as a
        promotion (lineage, history and rollback see it like a gate promotion), with the online figures as
        its metrics. Otherwise the champion stays and the version is tagged `experiment_stopped`. Either
        way the `experiment` alias is removed. `outcome` (promote, stop_worse, stop_no_difference) is
        kept as a param and a tag. Raises RegistryError when no experiment runs, or when a promotion is
        asked but the champion is no longer the one the experiment ran against."""
        info = self.experiment_info()
        if info is None:
            raise RegistryError(f"{self.model_name} has no online experiment running (no `{EXPERIMENT}` alias)")
        version, experiment_id = info["version"], info["experiment_id"]
        current = self.champion()
        compared_to = f"champion:{current.version}" if current is not None else "popularity"
        decision = GateDecision(promote=promote, reasons=list(reasons), checks={"online_experiment": promote},
                                compared_to=compared_to, primary_metric=primary_metric, metrics=dict(metrics))
        params = {"experiment_id": experiment_id, "outcome": outcome, "via": "online_experiment"}
        if promote:
            if current is None or str(current.version) != info["champion_version"]:
                raise RegistryError(f"the experiment {experiment_id} ran against champion "
                                    f"v{info['champion_version']}, but the champion is now "
                                    f"{'none' if current is None else 'v' + str(current.version)}: not promoted")
            self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
            self.client.delete_registered_model_alias(self.model_name, EXPERIMENT)
            self._record(version, DECISION_PROMOTED, decision,
                         extra_params={**params, "from_version": str(current.version)})
        else:
            self.client.delete_registered_model_alias(self.model_name, EXPERIMENT)
            self._record(version, DECISION_EXPERIMENT_STOPPED, decision, extra_params=params)
        self._tag_version(version, {f"{_TAG}experiment_outcome": outcome})
        return version

    def log_online_experiment(
        self,
        *,
        experiment_id: str,
        version: str,
        champion_version: str,
        outcome: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        reasons: Sequence[str],
        tables: Mapping[str, Any] | None = None,
    ) -> str:
        """One look at an online experiment as a run of `recloop-online-experiments` (params, the per-arm
        figures as metrics, the reasons, JSON tables as artifacts), linked from the experiment's version
        by the tags `recloop.online.last_run` and `recloop.experiment_outcome`. Returns the run id."""
        experiment = self._experiment_id(ONLINE_EXPERIMENTS)
        tags = {**self.run_tags, f"{_TAG}kind": "online_experiment", f"{_TAG}experiment_id": experiment_id,
                f"{_TAG}model_version": str(version), f"{_TAG}champion_version": str(champion_version),
                f"{_TAG}outcome": outcome, f"{_TAG}reasons": _tag_value(list(reasons)),
                NOTE_TAG: _tag_value("\n".join(f"- {r}" for r in reasons))}
        day = f" {params['as_of']}" if params.get("as_of") else ""
        run = self.client.create_run(experiment, run_name=f"{experiment_id}{day} {outcome}", tags=tags)
        run_id = run.info.run_id
        now = _ms(_now())
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))],
            params=[Param(k, _param_value(v)) for k, v in params.items()],
        )
        for name, content in (tables or {}).items():
            self.client.log_dict(run_id, json.loads(json.dumps(content, default=str)), name)
        self.client.set_terminated(run_id)
        # The version's outcome so far (`continue` until the final look; `end_experiment` writes it again).
        self._tag_version(str(version), {f"{_TAG}online.last_run": run_id, f"{_TAG}experiment_outcome": outcome})
        return run_id


def _decision_run_name(decision: str, version: str, params: Mapping[str, Any]) -> str:
    """A decision run's name: `promoted v3`, `refused v4`, `rolled back v3 -> v2`, `experiment started v4 vs v3`,
    `experiment stopped v4`."""
    words = _DECISION_WORDS.get(decision, decision)
    if decision == DECISION_ROLLED_BACK and params.get("to_version"):
        return f"{words} v{version} -> v{params['to_version']}"
    if decision == DECISION_EXPERIMENT_STARTED and params.get("champion_version"):
        return f"{words} v{version} vs v{params['champion_version']}"
    return f"{words} v{version}"


def _roll_back(stack: list[str], to_version: str | None) -> None:
    """The lineage after a rollback to `to_version`: back to its newest place in the lineage, or (a
    version rolled back past before) restored on top, so the next rollback returns to the champion it
    replaced. Older logs: one step back."""
    if not to_version:
        stack.pop()
    elif to_version in stack:
        del stack[len(stack) - stack[::-1].index(to_version):]
    else:
        stack.append(to_version)


def _one_line(err: BaseException) -> str:
    if summary := getattr(err, "summary", None):  # a CorruptModelError: the files, not a temporary folder
        return f"corrupt: {summary}"
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
