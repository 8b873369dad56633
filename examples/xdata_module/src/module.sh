# Sourced by train.sh, predict.sh and aggregate.sh: the run directory and where a run writes.
#   RUN_DIR  the run directory (default: the directory the platform starts the module in)
#   PYTHON   the interpreter that has mnist_edge installed (default python3)
# A run writes only its results under $RUN_DIR/output/ and scratch under $RUN_DIR/work/; it
# never reads configuration.json (the platform's API credentials) and writes nothing to the
# shared application/ or session/ directories, so concurrent runs cannot collide.
RUN_DIR="${RUN_DIR:-.}"
PYTHON="${PYTHON:-python3}"
SCRATCH="$RUN_DIR/work/mnist"
mkdir -p "$SCRATCH/tmp"
# Temporary files and library caches (matplotlib's config, any XDG cache) stay in scratch too.
TMPDIR="$SCRATCH/tmp" MPLCONFIGDIR="$SCRATCH/matplotlib" XDG_CACHE_HOME="$SCRATCH/cache"
PYTHONDONTWRITEBYTECODE=1
export TMPDIR MPLCONFIGDIR XDG_CACHE_HOME PYTHONDONTWRITEBYTECODE
