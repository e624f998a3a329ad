"""Jobs and schedules of the data plane (which ends with the day's drift report), and the executor every
job of the code location runs with."""


import dagster as dg

from pipelines.defs.features import FEAST_REGISTRY
from pipelines.defs.partitions import daily_partitions
from recloop.config import Settings


def executor_for(settings: Settings) -> dg.ExecutorDefinition:
    """The executor of every job, from `RECLOOP_DAGSTER_EXECUTOR` / `RECLOOP_DAGSTER_MAX_CONCURRENT`.

    `multiprocess` (default): each step in its own process, at most `dagster_max_concurrent` at once, on
    the machine the run worker is on. `in_process`: every step in the run worker's process, one after
    the other (cheaper for small runs and for debugging). `celery`: every step a task on the Celery
    broker, run by the workers of `RECLOOP_CELERY_QUEUE` on any machine (`recloop.scaleout`,
    deploy/celery.yaml). `k8s`: every step a Kubernetes Job (deploy/k8s/executor.yaml, with the
    K8sRunLauncher of deploy/k8s/dagster.yaml; docs/deployment.md). The assets do not change.
    """
    if settings.dagster_executor == "in_process":
        return dg.in_process_executor
    if settings.dagster_executor == "celery":
        import warnings

        from dagster_celery import celery_executor

        # dagster-celery registers its (identical) step task again for every step it submits; Celery 5.7
        # warns each time. Nothing to act on: keep it out of the runs' output.
        warnings.filterwarnings("ignore", message=r"Task name 'execute_plan' is already registered")

        from recloop.scaleout import executor_config

        return celery_executor.configured(executor_config(settings), name="celery")
    if settings.dagster_executor == "k8s":
        from dagster_k8s import k8s_job_executor

        from recloop.scaleout import k8s_executor_config

        return k8s_job_executor.configured(k8s_executor_config(), name="k8s")
    return dg.multiprocess_executor.configured(
        {"max_concurrent": settings.dagster_max_concurrent}, name="multiprocess"
    )


# Transient failures (a busy S3, a locked SQLite file) deserve a retry; a retry never duplicates data
# because every partition write replaces the partition. Bad data never reaches a retry: the blocking
# schema checks stop the partition before validation runs.
RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

def data_plane_job(daily: dg.PartitionsDefinition):
    """Every daily-partitioned asset of ingestion, validation and features, run per day in dependency order."""
    return dg.define_asset_job(
        name="data_plane_job",
        selection=dg.AssetSelection.groups("ingestion", "validation", "features", "monitoring") - dg.AssetSelection.keys(FEAST_REGISTRY),
        partitions_def=daily,
        description=("Ingest, validate (GX) and build features for one day, load them into the online store, and "
                     "report the day's drift against the champion's training window."),
        tags={"recloop/stage": "data_plane"},
        op_retry_policy=RETRY,
    )


feast_apply_job = dg.define_asset_job(
    name="feast_apply_job",
    selection=dg.AssetSelection.keys(FEAST_REGISTRY),
    description="`feast apply`: register feature_repo/ in Feast's registry (run after changing the repo).",
)

def daily_data_plane_schedule(job) -> dg.ScheduleDefinition:
    return dg.build_schedule_from_partitioned_job(
        job,
        name="daily_data_plane_schedule",
        hour_of_day=1,
        minute_of_hour=15,
        description="Every day at 01:15 UTC, run the data plane for the day that just ended.",
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )


@dg.definitions
def defs() -> dg.Definitions:
    # The executor given here is the code location's default: every job without its own uses it
    # (data_plane_job, feast_apply_job, training_job, drift_job, ...).
    job = data_plane_job(daily_partitions())
    return dg.Definitions(
        jobs=[job, feast_apply_job],
        schedules=[daily_data_plane_schedule(job)],
        executor=executor_for(Settings.from_env()),
    )
