# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t regserve-operator:0.1.0 .
#   docker build --target serving  -t regserve:0.1.0 .                       # CPU, sklearn extra
#   docker build --target serving  --build-arg RAY_IMAGE_TAG=2.60.0-py311-gpu \
#                --build-arg EXTRAS=sklearn,transformers -t regserve:0.1.0-gpu .
# Every install is pinned by constraints.txt (the lock the tests run with). This repository's tests lint
# this file with hadolint but do not build it (no Docker engine there).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RAY_IMAGE_TAG=2.60.0-py311

# ---------------------------------------------------------------------------------------------------
# operator: slim Python, no Ray, non-root. `regserve run` reads the registry over REST and never imports
# mlflow; mlflow-skinny stays for what imports it on demand: facts of versions whose artifacts are not
# behind the tracking server's artifact proxy (runs:/ sources, http artifact servers; S3/GCS/Azure also
# need their client libraries, which this image does not have) and `regserve webhook register`.
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY deploy/docker/operator-requirements.txt ./
COPY operator/ operator/
COPY serving_app/ serving_app/
# regserve's own dependencies include mlflow and Ray (the serving side): install the package without them
# and add only what the operator imports.
RUN python -m venv /opt/regserve \
 && /opt/regserve/bin/pip install -c constraints.txt -r operator-requirements.txt \
 && /opt/regserve/bin/pip install --no-deps .

FROM ${PYTHON_IMAGE} AS operator
ENV PATH=/opt/regserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
COPY --from=operator-build /opt/regserve /opt/regserve
RUN groupadd --system --gid 10001 regserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin regserve
USER 10001:10001
# 8080: MLflow webhook receiver (/webhook, /healthz); 9090: Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["regserve"]
CMD ["run", "--standalone", "--all-namespaces"]

# ---------------------------------------------------------------------------------------------------
# serving: the official Ray image of the pinned Ray version, plus serving_app, mlflow and the extras.
# EXTRAS: comma-separated pyproject extras; add `transformers` (torch, transformers) for the translation
# models, with a -gpu RAY_IMAGE_TAG for GPUs.
FROM rayproject/ray:${RAY_IMAGE_TAG} AS serving
ARG EXTRAS=sklearn
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /home/ray/regserve
COPY --chown=1000:100 constraints.txt pyproject.toml README.md ./
COPY --chown=1000:100 operator/ operator/
COPY --chown=1000:100 serving_app/ serving_app/
# Ray itself is already in the image at the pinned version; the constraints keep pip from moving it.
RUN pip install -c constraints.txt ".[${EXTRAS}]" \
 && python -c "import ray, serving_app.app; assert ray.__version__ == '2.60.0', ray.__version__"
# Ray pods run as this uid and group (the `ray` user of the base image): the operator sets runAsUser 1000,
# runAsGroup 100 and runAsNonRoot on them.
USER 1000:100
