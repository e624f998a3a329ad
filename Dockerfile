# syntax=docker/dockerfile:1
# recloop's one image: Dagster code location, webserver and daemon, the MLflow tracking server and the
# serving API all run it (docker-compose.yml); target `airflow` adds Airflow 3 for the `airflow` profile.
#
#   docker build -t recloop .                        # target `app` (the last stage)
#   docker build --target airflow -t recloop-airflow .
#
# Layers: OS packages, then torch (CPU wheel), then every other dependency pinned by constraints.txt,
# then the source. Editing the code rebuilds only the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RECLOOP_HOME=/var/lib/recloop \
    DAGSTER_HOME=/opt/dagster/home \
    AIRFLOW_HOME=/opt/airflow
# The libraries phone home by default; production machines often have no internet.
ENV DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false \
    DAGSTER_DISABLE_TELEMETRY=true \
    FEAST_USAGE=False \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

# curl: health checks; libgomp1: OpenMP of faiss, implicit and torch; tini: PID 1 that forwards signals
# (Dagster and uvicorn stop cleanly on `docker compose stop`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv "$VIRTUAL_ENV" && pip install --upgrade pip wheel

# torch first, pinned, from PyTorch's CPU index: PyPI's default build of the same version pulls ~2 GB of
# CUDA libraries that a CPU container never uses. constraints.txt's `torch==2.13.0` accepts `2.13.0+cpu`.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/recloop

# Dependencies only: empty packages stand in for the source, so this layer is reused until pyproject.toml
# or constraints.txt change.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p recloop pipelines && touch recloop/__init__.py pipelines/__init__.py \
    && pip install -c constraints.txt . \
    && pip uninstall -y recloop \
    && rm -rf recloop pipelines build recloop.egg-info

RUN groupadd --system --gid 10001 recloop \
    && useradd --system --uid 10001 --gid recloop --home-dir /var/lib/recloop --shell /usr/sbin/nologin recloop \
    && mkdir -p /var/lib/recloop /opt/dagster/home/storage /opt/airflow \
    && chown -R recloop:recloop /var/lib/recloop /opt/dagster /opt/airflow

# --------------------------------------------------------------------------------------------------
FROM runtime AS airflow-runtime

RUN mkdir -p recloop pipelines && touch recloop/__init__.py pipelines/__init__.py \
    && pip install -c constraints.txt ".[airflow]" \
    && pip uninstall -y recloop \
    && rm -rf recloop pipelines build recloop.egg-info

# --------------------------------------------------------------------------------------------------
FROM airflow-runtime AS airflow

COPY . .
# Editable: recloop finds monitoring/, feature_repo/, expectations/ and its package data (the serving
# safety list) beside its source, as in a checkout. The source stays root-owned and read-only.
RUN pip install --no-deps -c constraints.txt -e ".[airflow]" \
    && python -m compileall -q recloop pipelines dags \
    && chmod +x deploy/*.sh
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/recloop/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
USER recloop
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/recloop/deploy/entrypoint.sh"]
CMD ["airflow", "version"]

# --------------------------------------------------------------------------------------------------
FROM runtime AS app

# The production Dagster instance (runs, events, schedules on PostgreSQL) is deploy/dagster.yaml.
COPY . .
RUN pip install --no-deps -c constraints.txt -e . \
    && python -m compileall -q recloop pipelines \
    && chmod +x deploy/*.sh \
    && cp deploy/dagster.yaml /opt/dagster/home/dagster.yaml
USER recloop
# 8000: the serving API; 4000: the Dagster code location (gRPC); 3000: Dagster's UI; 5000: MLflow.
EXPOSE 8000 4000 3000 5000
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/recloop/deploy/entrypoint.sh"]
CMD ["recloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
