#!/bin/sh
# Data-platform module, predict step: label every row of the platform's image table export.
#   in:  $RUN_DIR/input/predict_dataset/dataset.csv  and  $RUN_DIR/input/models/mnist.pth
#   out: $RUN_DIR/output/predict_result/result.csv   (image_id,label,confidence)
# RUN_DIR defaults to the working directory the platform starts the module in.
set -eu
RUN_DIR="${RUN_DIR:-.}"
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m mnist_edge predict \
    --model "$RUN_DIR/input/models/mnist.pth" \
    "$RUN_DIR/input/predict_dataset/dataset.csv" \
    "$RUN_DIR/output/predict_result/result.csv"
