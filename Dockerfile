# camjobs on Ray's official image, for KubeRay pods, `ray up` clusters and plain `docker run`.
#
#   CPU (default):  docker build -t registry.example.com/camjobs:0.1.0-ray2.60.0-cpu .
#   GPU:            docker build --build-arg RAY_VARIANT=gpu -t registry.example.com/camjobs:0.1.0-ray2.60.0-gpu .
#
# RAY_VARIANT is the platform suffix of rayproject/ray's tags: `cpu`, `gpu` (an alias of the
# CUDA build Ray ships by default for this release) or an explicit CUDA build such as
# `cu128`. RAY_VERSION must stay the Ray version camjobs is developed and tested with
# (tests/test_deploy.py checks it against the installed ray.__version__): Ray's head,
# workers and the driver must all run the same Ray version.
#
# No ENTRYPOINT: KubeRay starts the containers with its own `ray start` command, and the
# RayJob entrypoint / CronJob command run `camjobs ...` directly.

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}

ARG RAY_VERSION
ARG RAY_VARIANT
# Where torch and torchvision come from. Empty: the CPU-only wheels for RAY_VARIANT=cpu
# (a few hundred MB instead of several GB of CUDA libraries), PyPI's default CUDA wheels
# otherwise. Set it for a specific CUDA build, e.g. https://download.pytorch.org/whl/cu126
# for nodes whose NVIDIA driver is too old for PyPI's default.
ARG TORCH_INDEX_URL=""

LABEL org.opencontainers.image.title="camjobs" \
      org.opencontainers.image.description="Class activation maps and weak lesion boxes for dermoscopy datasets, on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

# Ray's images run as user `ray` (uid 1000, gid 100 `users`) with home /home/ray and a
# conda Python on PATH that this user owns, so pip needs no root.
USER ray
WORKDIR /home/ray

# Only what the package build needs (see .dockerignore): source changes elsewhere in the
# repository do not invalidate this layer.
COPY --chown=1000:100 pyproject.toml README.md /tmp/camjobs-src/
COPY --chown=1000:100 camjobs /tmp/camjobs-src/camjobs

# torch first, from the right index, so that installing camjobs finds it satisfied and does
# not pull the default CUDA wheels into a CPU image. `ray[data]==RAY_VERSION` keeps pip
# from replacing the image's Ray while it adds Ray Data's dependencies.
RUN set -eux; \
    index="${TORCH_INDEX_URL}"; \
    if [ -z "$index" ]; then \
        if [ "${RAY_VARIANT}" = "cpu" ]; then index=https://download.pytorch.org/whl/cpu; \
        else index=https://pypi.org/simple; fi; \
    fi; \
    pip install --no-cache-dir --index-url "$index" "torch>=2.4" "torchvision>=0.19"; \
    pip install --no-cache-dir "ray[data]==${RAY_VERSION}" /tmp/camjobs-src; \
    rm -rf /tmp/camjobs-src; \
    python -c "import ray, camjobs.cli, torch; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"; \
    camjobs --help > /dev/null

# The job configs, at the path the manifests in deploy/k8s use (--config /home/ray/configs/...).
# To change a config without rebuilding, mount a ConfigMap over this directory.
COPY --chown=1000:100 configs /home/ray/configs

# Logs of `camjobs run` reach `kubectl logs` and `ray job logs` at once.
ENV PYTHONUNBUFFERED=1

ENTRYPOINT []
CMD ["bash"]
