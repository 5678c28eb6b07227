"""Regenerate planner/data/epoch2024_bootstrap.json: bootstrap samples behind epoch2024's bands.

Besiroglu et al. 2024 publish point estimates and standard errors, not their bootstrap samples, so
scaleplan replicates their refit (240 runs of Hoffmann et al.'s Figure 4, 5 outliers dropped, summed
Huber loss with delta 1e-3, L-BFGS from the 4500-start grid) and stores 1000 resampled fits.

    python benchmarks/epoch_bootstrap.py [--data ../shared/data/scaling/chinchilla_epoch_fig4.csv]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from planner.fit import fit_law
from planner.published import write_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scaling" / "chinchilla_epoch_fig4.csv"
OUT = REPO / "planner" / "data" / "epoch2024_bootstrap.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    frame = pd.read_csv(args.data)
    frame = frame.nsmallest(len(frame) - 5, "loss")  # the 5 outliers Besiroglu et al. dropped
    n = frame["Model Size"].to_numpy(dtype=float)
    d = frame["Training FLOP"].to_numpy(dtype=float) / (6 * n)
    result = fit_law(n, d, frame["loss"].to_numpy(dtype=float), bootstrap=args.resamples, seed=0)
    assert result.bootstrap is not None
    payload = {
        "source": f"{args.data.name}: {result.n_points} runs (Besiroglu et al. 2024 extraction)",
        "command": "python benchmarks/epoch_bootstrap.py",
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "point_estimate": result.params,
        "columns": list(result.param_names),
        "bootstrap": np.round(result.bootstrap, 8).tolist(),
    }
    write_atomic(OUT, json.dumps(payload) + "\n")
    print(f"wrote {OUT} ({len(payload['bootstrap'])} samples); point estimate {result.params}")


if __name__ == "__main__":
    main()
