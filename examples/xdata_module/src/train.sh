#!/bin/sh
# Script "train" of definitions/definition.json: the MNIST CNN on the platform's table export.
#   in:  train_dataset (mnist_dataset)  $RUN_DIR/input/train_dataset/dataset.csv
#   out: trained_model (mnist_model)    $RUN_DIR/output/models/  (mnist.pth, mnist.xdata-meta.json)
# EPOCHS (default 1): passes over the training data. RUN_DIR and PYTHON: see module.sh.
set -eu
. "$(dirname "$0")/module.sh"
mkdir -p "$RUN_DIR/output/models"
exec "$PYTHON" -m mnist_edge train --epochs "${EPOCHS:-1}" \
    --model "$RUN_DIR/output/models/mnist.pth" \
    "$RUN_DIR/input/train_dataset/dataset.csv"
