"""RESULTS.md §4.5: ZOODiP, GF-TI and first-order TI at 3,000 UNet forward passes on red_circle (3 seeds).

python docs/results/equal_passes.py [OUTPUTS_RESULTS_DIR]   # reads the runs, writes equal_passes.png beside this
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def runs(root: Path) -> dict[str, list[float]]:
    """subject_accuracy per seed 0, 1, 2 of each method (the ZOODiP runs are Table S4's RGE jobs)."""
    s4 = pd.read_csv(root / "ablations/tableS4_estimators/report/runs.csv")
    zoodip = s4[s4["estimator"] == "rge"].sort_values("train.seed")["subject_accuracy"].tolist()
    out = {"ZOODiP\n1,000 steps x 3": zoodip}
    for name, label in (("gfti", "GF-TI\n150 gen. x 20"), ("ti3000", "TI (backprop)\n3,000 steps")):
        jobs = [json.loads((root / "gfti_compare" / name / str(i) / "metrics.json").read_text()) for i in range(3)]
        out[label] = [j["eval"]["subject_accuracy"] for j in jobs]
    return out


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("outputs/results")
    data = runs(root)
    fig = Figure(figsize=(5.5, 3.2), dpi=120)
    ax = fig.add_subplot()
    means = [np.mean(v) for v in data.values()]
    sds = [np.std(v, ddof=1) for v in data.values()]
    ax.bar(range(len(data)), means, yerr=sds, capsize=4, color=["#4c72b0", "#dd8452", "#55a868"])
    for i, values in enumerate(data.values()):
        ax.plot([i] * len(values), values, "k.", ms=5)
    ax.set_xticks(range(len(data)), list(data))
    ax.set_ylim(0, 1)
    ax.set_ylabel("subject_accuracy")
    ax.set_title("red_circle, 3,000 UNet forward passes each (mean ± sd, 3 seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(Path(__file__).with_name("equal_passes.png"))


if __name__ == "__main__":
    main()
