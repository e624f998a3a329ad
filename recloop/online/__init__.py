"""The analysis side of online experiments and the feedback-loop monitor.

* `metrics`: per-arm CTR, watch time per impression, completion rate and coverage from
  `silver/impression_outcomes`, with 95 % intervals clustered by user (delta method); interleaving
  credit per request and the challenger's win share.
* `decision`: the sequential rule (mixture SPRT, always-valid p-values, a horizon) that decides
  promote / stop_worse / stop_no_difference / continue, looked at daily.
* `experiment`: start an experiment (the `experiment` alias) and conclude it (the daily look, recorded in
  MLflow, the registry changed on a final outcome).
* `ips`: inverse-propensity (clipped, self-normalised) estimates of another policy's CTR from logged
  impressions with propensities.
* `traffic`: the served-traffic monitor (popularity concentration, coverage, category shares against a
  reference window).

docs/online.md explains the rule and its error guarantees. Dagster: pipelines/defs/online.py; the
lifecycle steps: `recloop.lifecycle.online_experiment_step`, `served_traffic_step`.
"""
