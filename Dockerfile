# syntax=docker/dockerfile:1
# One image for every fedguard service (processors, aggregator, fleet, the one-shot init and the producer CLI);
# compose.yaml picks the command. Build: docker compose build (or: docker build -t fedguard:local .).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# Fashion-MNIST from Debian (IDX gz under /usr/share/datasets/fashion-mnist/): nothing is downloaded at run time.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU-only index: the default index would pull gigabytes of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The remaining dependencies, read from pyproject.toml, in their own layer so code changes do not reinstall them.
WORKDIR /opt/fedguard
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY fedguard ./fedguard
COPY producers ./producers
COPY processors ./processors
COPY aggregator ./aggregator
RUN pip install . \
    && python -c "import fedguard.cli, processors.app, aggregator.service, producers.fleet"

# Run unprivileged. /data is where compose mounts the shared volume (keys, keystore, model versions); a fresh named
# volume takes this directory's owner. Faust keeps its small local state under the working directory.
RUN useradd --create-home --uid 10001 --user-group fedguard \
    && mkdir -p /data \
    && chown fedguard:fedguard /data
USER fedguard
WORKDIR /home/fedguard
ENV FEDGUARD_DATA_DIR=/data \
    FEDGUARD_METRICS_HOST=0.0.0.0

# Metrics: processors, aggregator, fleet.
EXPOSE 19464 19465 19466

CMD ["fedguard", "--help"]
