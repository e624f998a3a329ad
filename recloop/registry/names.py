"""The registry's names: aliases, decisions, MLflow experiments and tags, and its error."""

from __future__ import annotations

from pathlib import Path

CHAMPION = "champion"
CHALLENGER = "challenger"
# The version under an online experiment against the champion (it passed the offline and latency gates);
# serving splits traffic between `champion` and `experiment` while the alias exists.
EXPERIMENT = "experiment"
PROMOTIONS_EXPERIMENT = "recloop-promotions"
DEFAULT_MODEL_NAME = "recloop-recommender"
MODEL_ARTIFACT_NAME = "model"
BUNDLE_ARTIFACT = "bundle"
BUNDLE_MODEL_CODE = Path(__file__).parents[1] / "bundle_model.py"

# Packages the bundle needs at serving time, pinned to what is installed (local labels such as `+cpu`
# dropped: MLflow would otherwise record requirements pip cannot resolve). recloop itself must be
# installed where the model is served: the bundle model imports `recloop.model_plane`.
RUNTIME_PACKAGES = ("mlflow", "torch", "faiss-cpu", "lightgbm", "numpy", "pandas", "scipy")

DECISION_PROMOTED = "promoted"
DECISION_REFUSED = "refused"
DECISION_ROLLED_BACK = "rolled_back"
# Online experiments (`recloop.online`): a gate-passing candidate put under the `experiment` alias, and
# one whose experiment ended without promotion (a promotion after one is recorded as DECISION_PROMOTED).
DECISION_EXPERIMENT_STARTED = "experiment_started"
DECISION_EXPERIMENT_STOPPED = "experiment_stopped"
ONLINE_EXPERIMENTS = "recloop-online-experiments"

# MLflow 3 tells ML experiments from GenAI ones by this experiment tag; recloop's experiments are ML ones.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
ML_EXPERIMENT_KIND = "custom_model_development"
# The description MLflow's UI shows on an experiment, a run or (as its own field) a model version.
NOTE_TAG = "mlflow.note.content"
TRAINING_EXPERIMENT = "recloop-training"
MONITORING_EXPERIMENT = "recloop-monitoring"
EXPERIMENT_DESCRIPTIONS = {
    TRAINING_EXPERIMENT: "One run per training cycle: hyper-parameters, training curves, the training window as "
                         "a dataset, every recommender's offline evaluation, the bundle as one model (registered "
                         "as a version of the model).",
    PROMOTIONS_EXPERIMENT: "The registry's decision log: one run per promotion, refusal, rollback and online "
                           "experiment start or stop, with the reasons (recloop models, recloop rollback read it).",
    MONITORING_EXPERIMENT: "One run per day's drift report against the champion's training window.",
    ONLINE_EXPERIMENTS: "One run per daily look at an online experiment (champion against the `experiment` alias).",
}
# Decision names as run names say them.
_DECISION_WORDS = {DECISION_ROLLED_BACK: "rolled back", DECISION_EXPERIMENT_STARTED: "experiment started",
                   DECISION_EXPERIMENT_STOPPED: "experiment stopped"}

_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_TAG = "recloop."


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (no champion, stale decision, ...)."""
