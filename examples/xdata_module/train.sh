#!/bin/sh
# Data-platform module, train step: the MNIST CNN on the platform's image table export.
#   in:  $RUN_DIR/input/train_dataset/dataset.csv
#   out: $RUN_DIR/output/models/mnist.pth  and  $RUN_DIR/output/models/mnist.xdata-meta.json
# RUN_DIR defaults to the working directory the platform starts the module in.
# EPOCHS (default 1) is the module's parameter; PYTHON picks the interpreter with mnist_edge.
set -eu
RUN_DIR="${RUN_DIR:-.}"
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m mnist_edge train --epoch "${EPOCHS:-1}" \
    --model "$RUN_DIR/output/models/mnist.pth" \
    "$RUN_DIR/input/train_dataset/dataset.csv"
