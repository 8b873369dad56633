# mnist-edge on a CPU torch: the image the pipeline specs in examples/pipeline/ and the
# Kubeflow manifests in examples/kubeflow/ name (mnist-edge:0.1.0, the package's version: a
# pinned tag, never latest), and an edge node that runs `scaleout client start` on the compute
# package in /app/client with the node's shards mounted at SCALEOUT_DATA_DIR (/data).
# GIT_COMMIT is recorded in every model's lineage (mnist_edge/lineage.py).
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t mnist-edge:0.1.0 .
#   docker run -v /srv/mnist-shards:/data mnist-edge:0.1.0 \
#       scaleout client start --api-url https://<your project> --token <client token>
# A CUDA build instead: --build-arg TORCH_INDEX_URL=<a PyTorch CUDA wheel index>.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCALEOUT_DATA_DIR=/data
WORKDIR /app
# Requirements before the source: a code change does not reinstall torch.
COPY examples/xdata_module/src/mnist/requirements.txt requirements.txt
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -r requirements.txt
COPY pyproject.toml README.rst /tmp/mnist-edge/
COPY client/mnist_edge /tmp/mnist-edge/client/mnist_edge
# Declared here, after the dependencies: a new commit does not reinstall torch.
ARG GIT_COMMIT=""
RUN if [ -n "$GIT_COMMIT" ]; then printf '%s\n' "$GIT_COMMIT" > /tmp/mnist-edge/client/mnist_edge/GIT_COMMIT; fi \
    && pip install --no-cache-dir --no-deps /tmp/mnist-edge && rm -rf /tmp/mnist-edge \
    && useradd --create-home --uid 10001 edge && mkdir -p /data && chown 10001 /app /data
# The client runs the package from ./client and writes ./package, ./.scaleout, ./.model_cache.
COPY --chown=10001 client/ /app/client/
USER 10001
VOLUME ["/data"]
CMD ["scaleout", "client", "start"]
