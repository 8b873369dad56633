#!/bin/sh
# Script "aggregate" of definitions/definition.json: FedAvg of a set of trained models.
#   in:  models (mnist_model_set: one mnist_model directory per model)  $RUN_DIR/input/models/
#   out: aggregated_model (mnist_model)  $RUN_DIR/output/models/  (mnist.pth, mnist.xdata-meta.json)
# Weighted by each model's num_examples; the meta lists the parents. RUN_DIR and PYTHON: see module.sh.
set -eu
. "$(dirname "$0")/module.sh"
mkdir -p "$RUN_DIR/output/models"
exec "$PYTHON" -m mnist_edge aggregate "$RUN_DIR/input/models" "$RUN_DIR/output/models/mnist.pth"
