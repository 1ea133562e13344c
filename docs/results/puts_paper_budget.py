"""RESULTS.md, "PUTS at the paper's budget": the record of `zoodip-study spec=puts_paper_budget`, analysed.

    python docs/results/puts_paper_budget.py     # statistics and puts_paper_budget.png from the records (seconds)

The PUTS arm (t ~ U(500, 900), Eq. 9) is the `zoodip` arm of the central claim's study (docs/results/paper_budget/
runs.csv: the same overrides, subjects and seeds); the uniform arm (t ~ U(0, 1000)) is in
docs/results/puts_paper_budget/runs.csv. The test was stated before the runs (studies/puts_paper_budget.yaml):
PUTS - uniform over the (subject, seed) pairs of subject_accuracy, two-sided paired t-test; "holds" needs the 95% CI
above 0, "does not hold (uniform higher)" below 0, "does not hold (equivalent)" inside +-0.05, otherwise
inconclusive. image_similarity is reported beside it, as a secondary metric without a verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import paper_budget as central_study  # beside this file: its record holds the PUTS arm
from matplotlib.figure import Figure

from zoodip.analysis.report import paired_summary, paired_verdict

HERE = Path(__file__).resolve().parent
RECORD = HERE / "puts_paper_budget" / "runs.csv"
MARGIN = 0.05
PLANNED, FIRST_LOOK = 24, 12
METRICS = ["subject_accuracy", "image_similarity"]


def runs() -> pd.DataFrame:
    """Both records as one frame: the central claim's `zoodip` arm renamed `puts`, and `puts_uniform`."""
    reference = pd.read_csv(HERE / "paper_budget" / "runs.csv")
    reference = reference[reference.arm == "zoodip"].assign(arm="puts")
    own = pd.read_csv(RECORD) if RECORD.is_file() else reference.iloc[:0]
    return pd.concat([reference, own], ignore_index=True)


def pairs(frame: pd.DataFrame, metric: str = "subject_accuracy") -> pd.DataFrame:
    """PUTS and uniform side by side, one row per (subject, seed) that both arms have."""
    return central_study.pairs(frame, "puts", "puts_uniform", metric)


def verdict(s: dict) -> str:
    """The stated rule for PUTS - uniform."""
    equivalent = f"does not hold (equivalent within ±{MARGIN})"
    return paired_verdict(s, MARGIN, "holds", "does not hold (uniform higher)", equivalent)


def plot(p: pd.DataFrame, s: dict, out: Path) -> None:
    """Left: each pair's two accuracies, PUTS against uniform (above the diagonal: PUTS higher). Right: each pair's
    difference and their mean with its 95% CI, against the ±0.05 margin."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])
    seeds = p.index.get_level_values("seed")
    for seed in sorted(set(seeds)):
        rows = p[seeds == seed]
        left.scatter(rows["puts_uniform"], rows["puts"], s=18, label=f"seed {seed}")
    lo, hi = float(p.min().min()) - 0.02, float(p.max().max()) + 0.02
    left.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
    left.set_xlabel("uniform, t ~ U(0, 1000)")
    left.set_ylabel("PUTS, t ~ U(500, 900)")
    left.set_title(f"subject_accuracy, {len(p)} (subject, seed) pairs", fontsize=9)
    left.legend(fontsize=8)
    diff = (p["puts"] - p["puts_uniform"]).to_numpy()
    # each pair's difference, spread vertically so that equal values stay visible
    right.scatter(diff, np.linspace(-0.3, 0.3, len(diff)), s=10, color="0.55")
    if s["pairs"] >= 2:
        m = s["mean_difference"]
        right.errorbar([m], [0], xerr=[[m - s["ci_low"]], [s["ci_high"] - m]], fmt="o", capsize=4)
    right.axvline(0, color="0.6", lw=0.8)
    for x in (-MARGIN, MARGIN):
        right.axvline(x, color="tab:red", ls="--", lw=0.8)
    right.set_yticks([0], ["PUTS - uniform"])
    right.set_ylim(-0.6, 0.6)
    right.set_xlabel("subject_accuracy difference (95% CI; dashed: ±0.05)")
    fig.suptitle("PUTS against uniform timesteps at 10,000 steps on the toy world", fontsize=10)
    fig.savefig(out, dpi=110)


def main() -> None:
    frame = runs()
    by_metric = {metric: pairs(frame, metric) for metric in METRICS}
    stats = {
        metric: paired_summary(p["puts"], p["puts_uniform"]) if len(p) >= 2 else {"pairs": len(p)}
        for metric, p in by_metric.items()
    }
    for metric, s in stats.items():
        if s["pairs"] < 2:
            print(f"PUTS - uniform, {metric}: {s['pairs']} pairs of {PLANNED} recorded")
            continue
        status = "" if s["pairs"] >= PLANNED else f" (interim: {s['pairs']} of {PLANNED} pairs)"
        ruled = verdict(s) if s["pairs"] >= FIRST_LOOK else "no verdict yet"
        print(
            f"PUTS - uniform, {metric}: pairs {s['pairs']}, mean {s['mean_difference']:+.3f} "
            f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], p {s['t_test_p']:.3g}, detectable "
            f"{s['detectable_effect']:.3f}: {ruled if metric == METRICS[0] else 'secondary, no verdict'}{status}"
        )
    p = by_metric[METRICS[0]]
    if len(p):
        wins = int((p["puts"] > p["puts_uniform"]).sum()), int((p["puts"] < p["puts_uniform"]).sum())
        print(
            f"over the {len(p)} pairs: PUTS {p['puts'].mean():.3f}, uniform {p['puts_uniform'].mean():.3f}; "
            f"PUTS higher on {wins[0]}, lower on {wins[1]}"
        )
        for arm, g in frame[frame.set_index(["subject", "seed"]).index.isin(p.index)].groupby("arm"):
            print(f"{arm}: {len(g)} runs, median wall {g.wall_seconds.median():.0f} s")
        plot(p, stats[METRICS[0]], HERE / "puts_paper_budget.png")
        print(f"wrote {HERE / 'puts_paper_budget.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
