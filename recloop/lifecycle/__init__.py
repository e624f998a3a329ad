"""The lifecycle steps as an orchestrator runs them, shared by the Dagster assets (`pipelines/defs/`) and
the Airflow tasks (`dags/`).

A step here is what one asset or task does beyond calling a core function: the decision of a check, the
alert it sends (event type, key, text and payload), drift episodes and the retraining decision, the
promotion gate with its record in the registry, and the plain summary of what was built. Each function
returns plain values: Dagster turns them into asset metadata and check results, Airflow passes them on as
XCom. Neither orchestrator holds logic of its own, so a Dagster run and an Airflow run over the same data
make the same decisions.

Alerts are returned, not sent (`Alert`): Dagster sends them through its `AlertsResource`, Airflow through
`send_alert`; both end in `recloop.alerts` with the same event ids, so a step that runs again does not
deliver the same event twice.

Imports stay light (numpy, torch, GX, Feast, MLflow load inside the functions): Airflow parses dags/,
which import this package, every few seconds.

The parts, in the order a day's run meets them (each re-exported here: `recloop.lifecycle.<name>`):

| part | what |
|---|---|
| `alerts.py` | `Alert` (what a step wants sent), `send_alert`, `jsonable` (a result as plain JSON) |
| `data.py` | one day: ingest, schema check, validate, served join, impression outcomes, features, Feast |
| `history.py` | a range of days in bulk (history imports): `history_range`, `ingest_range`, ... |
| `model.py` | training set, ranker, evaluation against the champions, `model.corrupt` alerts, registration |
| `gate.py` | the offline promotion gate, the latency gate, the promotion (or an online experiment) |
| `drift.py` | a day's drift decision and episode, its record in the lake, the links to its report |
| `retraining.py` | cooldown, schedule, automation switch, the retraining plan and its failure alert |
| `online.py` | the online experiment's daily step and the served-traffic monitor's |

Dependencies go one way: every part may use `alerts`; `gate` uses `model` and `online`, `drift` uses `model`;
no part imports this package's `__init__`. An adapter calls `lifecycle.<step>(...)`, looked up at call
time, so a test that patches `recloop.lifecycle.<step>` replaces the step the adapter runs.
"""

from __future__ import annotations

from recloop.lifecycle.alerts import (
    Alert,
    jsonable,
    send_alert,
)
from recloop.lifecycle.data import (
    SchemaCheck,
    Validation,
    apply_feature_repo,
    check_schema,
    compute_features,
    impression_outcomes,
    ingest,
    join_served,
    materialize_online,
    online_summary,
    validate,
)
from recloop.lifecycle.drift import (
    DriftOutcome,
    drift_links,
    drift_record_key,
    drift_report,
    episode_start,
    read_drift_record,
)
from recloop.lifecycle.gate import (
    GateOutcome,
    GateRefused,
    LatencyOutcome,
    Promotion,
    check_gate,
    check_latency,
    gate_config,
    latency_refusal,
    promote_candidate,
    replay_latency,
)
from recloop.lifecycle.history import (
    check_schema_range,
    compute_features_range,
    history_range,
    ingest_range,
    join_served_range,
    validate_range,
)
from recloop.lifecycle.model import (
    VERSION_FILE,
    build_training_set,
    candidate_version,
    champion_candidates,
    corrupt_model_alert,
    corrupt_model_alerts,
    evaluate_candidate,
    evaluation_figures,
    register_candidate,
    train_ranking,
)
from recloop.lifecycle.online import (
    ONLINE_EXPERIMENTS_ENV,
    ExperimentOutcome,
    TrafficOutcome,
    online_experiment_step,
    online_experiments_enabled,
    served_traffic_step,
)
from recloop.lifecycle.retraining import (
    AUTOMATION_ENV,
    COOLDOWN_ENV,
    CRON_ENV,
    TIMEZONE_ENV,
    RetrainingPlan,
    RetrainingRequest,
    automation_enabled,
    plan_retraining,
    retrain_cooldown,
    retrain_schedule,
    retraining_failed_alert,
    retraining_key,
)

__all__ = [
    "AUTOMATION_ENV",
    "COOLDOWN_ENV",
    "CRON_ENV",
    "TIMEZONE_ENV",
    "Alert",
    "DriftOutcome",
    "GateOutcome",
    "ExperimentOutcome",
    "GateRefused",
    "ONLINE_EXPERIMENTS_ENV",
    "Promotion",
    "RetrainingPlan",
    "RetrainingRequest",
    "SchemaCheck",
    "Validation",
    "apply_feature_repo",
    "automation_enabled",
    "build_training_set",
    "candidate_version",
    "check_gate",
    "check_latency",
    "LatencyOutcome",
    "latency_refusal",
    "check_schema",
    "check_schema_range",
    "champion_candidates",
    "compute_features",
    "compute_features_range",
    "corrupt_model_alert",
    "corrupt_model_alerts",
    "drift_links",
    "drift_record_key",
    "drift_report",
    "episode_start",
    "evaluate_candidate",
    "evaluation_figures",
    "gate_config",
    "history_range",
    "impression_outcomes",
    "ingest",
    "join_served",
    "join_served_range",
    "ingest_range",
    "jsonable",
    "materialize_online",
    "online_experiment_step",
    "online_experiments_enabled",
    "online_summary",
    "plan_retraining",
    "promote_candidate",
    "read_drift_record",
    "register_candidate",
    "retrain_cooldown",
    "retrain_schedule",
    "retraining_failed_alert",
    "retraining_key",
    "send_alert",
    "served_traffic_step",
    "TrafficOutcome",
    "validate",
    "validate_range",
]

# Not in `__all__`, yet used as `lifecycle.<name>` by the adapters and tests: the ranker step, the latency
# replay, the file naming the registered candidate. Named here so they stay re-exported.
_ALSO_EXPORTED = (VERSION_FILE, replay_latency, train_ranking)
