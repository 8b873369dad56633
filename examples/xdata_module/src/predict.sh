#!/bin/sh
# Script "predict" of definitions/definition.json: label every row of the platform's table export.
#   in:  predict_dataset (mnist_dataset)  $RUN_DIR/input/predict_dataset/dataset.csv
#        trained_model (mnist_model)      $RUN_DIR/input/models/  (mnist.pth)
#   out: predict_result (mnist_predict_result)  $RUN_DIR/output/predict_result/result.csv
# RUN_DIR and PYTHON: see module.sh.
set -eu
. "$(dirname "$0")/module.sh"
mkdir -p "$RUN_DIR/output/predict_result"
exec "$PYTHON" -m mnist_edge predict \
    --model "$RUN_DIR/input/models/mnist.pth" \
    "$RUN_DIR/input/predict_dataset/dataset.csv" \
    "$RUN_DIR/output/predict_result/result.csv"
