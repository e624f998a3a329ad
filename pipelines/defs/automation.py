"""Whether the code location's schedules and sensors start running by themselves: off by default, so a
`make ui` left open on the demo's home trains nothing every night; RECLOOP_DAGSTER_AUTOMATION=on (the
production stack sets it) starts the retraining schedule and both sensors. Either way each one can be
switched on or off in the UI (Automation), and the daemon keeps that choice. The daily data-plane and
online schedules always start stopped (docs/deployment.md)."""

import dagster as dg

from recloop import lifecycle


def schedule_status() -> dg.DefaultScheduleStatus:
    return dg.DefaultScheduleStatus.RUNNING if lifecycle.automation_enabled() else dg.DefaultScheduleStatus.STOPPED


def sensor_status() -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus.RUNNING if lifecycle.automation_enabled() else dg.DefaultSensorStatus.STOPPED
