"""Build entry point: ``scaleout run build -p client`` writes the seed model.

Output: ``$SCALEOUT_BUILD_OUTPUT_DIR/seed.npz`` (default: the current directory), the CNN's
8 parameter arrays in numpyhelper layout. The weights come from a fixed seed and the file
has fixed timestamps, so every build writes the same bytes.
"""

import os
from pathlib import Path

from mnist_edge.model import PARAMETER_COUNT, get_parameters, new_model, save_npz

SEED = 0


def build() -> Path:
    out_dir = Path(os.environ.get("SCALEOUT_BUILD_OUTPUT_DIR") or os.getcwd())
    params = get_parameters(new_model(SEED))
    count = sum(p.size for p in params)
    assert count == PARAMETER_COUNT, f"CNN has {count} parameters, expected {PARAMETER_COUNT}"
    path = save_npz(params, out_dir / "seed.npz")
    print(f"wrote seed model {path} ({len(params)} arrays, {count:,} parameters)")
    return path


if __name__ == "__main__":
    build()
