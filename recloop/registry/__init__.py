"""The model registry discipline: log a training run, register its bundle, gate, promote, refuse, roll back.

One registered version = one model *bundle* (two-tower retrieval model, FAISS index, ranker), logged as a
single MLflow pyfunc model from code (`recloop/bundle_model.py`), so the three parts are promoted and
rolled back together. Stages are not used; three aliases say where a version stands: `challenger` (the
candidate of the cycle in progress, until the decision), `experiment` (under an online experiment against
the champion) and `champion` (what serving follows).

The parts:

* `store`: `Registry`, the typed wrapper around MLflow: training runs, registration, aliases, the
  decision log (experiment `recloop-promotions`), history, rollback, verification, drift and online
  experiment runs, links to the MLflow UI.
* `gate`: `GateConfig` and `decide`, the promotion gate: pure logic over metric dicts, no MLflow.
* `settings`: `registry_settings` and `open_registry`: which MLflow store and model name the settings give.
* `names`: the aliases, decision names, MLflow experiment names and tags; `RegistryError`.
* `relocation`: `rehome_artifacts`, for an embedded store whose home was copied or moved.
"""

from recloop.registry.gate import GateConfig, GateDecision, decide
from recloop.registry.names import (
    BUNDLE_ARTIFACT,
    BUNDLE_MODEL_CODE,
    CHALLENGER,
    CHAMPION,
    DECISION_EXPERIMENT_STARTED,
    DECISION_EXPERIMENT_STOPPED,
    DECISION_PROMOTED,
    DECISION_REFUSED,
    DECISION_ROLLED_BACK,
    DEFAULT_MODEL_NAME,
    EXPERIMENT,
    EXPERIMENT_DESCRIPTIONS,
    EXPERIMENT_KIND_TAG,
    ML_EXPERIMENT_KIND,
    MODEL_ARTIFACT_NAME,
    MONITORING_EXPERIMENT,
    NOTE_TAG,
    ONLINE_EXPERIMENTS,
    PROMOTIONS_EXPERIMENT,
    RUNTIME_PACKAGES,
    TRAINING_EXPERIMENT,
    RegistryError,
)
from recloop.registry.relocation import rehome_artifacts
from recloop.registry.settings import RegistrySettings, open_registry, registry_settings
from recloop.registry.store import BUNDLE_SIGNATURE, Registry, data_range, default_pip_requirements

__all__ = [
    "BUNDLE_ARTIFACT", "BUNDLE_MODEL_CODE", "BUNDLE_SIGNATURE", "CHALLENGER", "CHAMPION",
    "DECISION_EXPERIMENT_STARTED", "DECISION_EXPERIMENT_STOPPED", "DECISION_PROMOTED", "DECISION_REFUSED",
    "DECISION_ROLLED_BACK", "DEFAULT_MODEL_NAME", "EXPERIMENT", "EXPERIMENT_DESCRIPTIONS", "EXPERIMENT_KIND_TAG",
    "ML_EXPERIMENT_KIND", "MODEL_ARTIFACT_NAME", "MONITORING_EXPERIMENT", "NOTE_TAG", "ONLINE_EXPERIMENTS",
    "PROMOTIONS_EXPERIMENT", "RUNTIME_PACKAGES", "TRAINING_EXPERIMENT", "GateConfig", "GateDecision", "Registry",
    "RegistryError", "RegistrySettings", "data_range", "decide", "default_pip_requirements", "open_registry",
    "registry_settings", "rehome_artifacts",
]
