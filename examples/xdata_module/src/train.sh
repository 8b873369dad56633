#!/bin/sh
# Script "train" of definitions/definition.json: the MNIST CNN on the platform's table export.
#   in:  train_dataset (mnist_dataset)  $RUN_DIR/input/train_dataset/dataset.csv
#   out: trained_model (mnist_model)    $RUN_DIR/output/models/  (mnist.pth, mnist.xdata-meta.json)
# EPOCHS (default 1): passes over the training data. RUN_DIR and PYTHON: see module.sh.
# MNIST_EDGE_DP_EPSILON (a privacy budget) makes every run DP-SGD, charged in a privacy ledger
# that must outlive the run: MNIST_EDGE_DP_LEDGER, an absolute path outside the run directory
# (one ledger per dataset). Each run directory is new, so a ledger in it would start a fresh
# budget every run: without one the run is refused before it trains.
set -eu
. "$(dirname "$0")/module.sh"
if [ -n "${MNIST_EDGE_DP_EPSILON+set}" ]; then
    case "${MNIST_EDGE_DP_LEDGER:-}" in
        /*) ;;
        *) echo "error: MNIST_EDGE_DP_EPSILON is set, so this run trains with differential privacy, but" \
                "MNIST_EDGE_DP_LEDGER is not an absolute path: each run gets a fresh run directory, so the" \
                "ledger must live on storage that outlives runs (one per dataset), or every run would start" \
                "a new budget" >&2
           exit 2 ;;
    esac
    run_dir=$(cd "$RUN_DIR" && pwd -P)
    ledger_dir=$(dirname "$MNIST_EDGE_DP_LEDGER")
    ledger_dir=$(cd "$ledger_dir" 2>/dev/null && pwd -P || echo "$ledger_dir")
    case "$ledger_dir/" in
        "$run_dir"/*) echo "error: MNIST_EDGE_DP_LEDGER $MNIST_EDGE_DP_LEDGER is inside this run's directory" \
                           "$run_dir, which the next run will not see: put it on storage that outlives runs" >&2
                      exit 2 ;;
    esac
fi
mkdir -p "$RUN_DIR/output/models"
exec "$PYTHON" -m mnist_edge train --epochs "${EPOCHS:-1}" \
    --model "$RUN_DIR/output/models/mnist.pth" \
    "$RUN_DIR/input/train_dataset/dataset.csv"
