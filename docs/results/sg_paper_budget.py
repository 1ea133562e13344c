"""RESULTS.md, "Subspace Gradient at the paper's budget": the record of `zoodip-study spec=sg_paper_budget`, analysed.

    python docs/results/sg_paper_budget.py     # statistics and sg_paper_budget.png from the records (seconds)

The tau = 128 arm is the `zoodip` arm of the central claim's study (docs/results/paper_budget/runs.csv: the same
overrides, subjects and seeds); SG off and tau = 43 are in docs/results/sg_paper_budget/runs.csv. The test was stated
before the runs (studies/sg_paper_budget.yaml): paired differences of subject_accuracy against the tau = 128 arm over
the (subject, seed) pairs, two-sided paired t-test; "helps" or "hurts" needs the 95% CI to exclude 0, "equivalent"
needs it inside +-0.05, otherwise inconclusive.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import paper_budget as central_study  # beside this file: its record holds the tau = 128 arm
from matplotlib.figure import Figure

from zoodip.analysis.report import paired_summary, paired_verdict

HERE = Path(__file__).resolve().parent
MARGIN = 0.05
PLANNED = 36
# no verdict before one seed of every subject: a handful of pairs says little about the spread
FIRST_LOOK = 12
# the arm against the reference, and what "mine > reference" means for SG
CONTRASTS = {"sg_off": "SG off - tau 128", "sg_tau43": "tau 43 - tau 128"}


def runs() -> pd.DataFrame:
    """Both records as one frame, the central claim's `zoodip` arm renamed `sg_tau128`."""
    reference = pd.read_csv(HERE / "paper_budget" / "runs.csv")
    reference = reference[reference.arm == "zoodip"].assign(arm="sg_tau128")
    path = HERE / "sg_paper_budget" / "runs.csv"
    own = pd.read_csv(path) if path.is_file() else reference.iloc[:0]
    return pd.concat([reference, own], ignore_index=True)


def pairs(frame: pd.DataFrame, arm: str, metric: str = "subject_accuracy") -> pd.DataFrame:
    return central_study.pairs(frame, arm, "sg_tau128", metric)


def verdict(s: dict, arm: str) -> str:
    """The stated rule. For SG off, higher accuracy means SG hurts; for tau 43, that the smaller tau helps."""
    if arm == "sg_off":
        equivalent = f"does not hold (equivalent within ±{MARGIN})"
        return paired_verdict(s, MARGIN, "does not hold (SG hurts)", "holds (SG off lower)", equivalent)
    return paired_verdict(s, MARGIN)


def summaries(frame: pd.DataFrame) -> dict[str, dict]:
    out = {}
    for arm in CONTRASTS:
        p = pairs(frame, arm)
        out[arm] = paired_summary(p[arm], p["sg_tau128"]) if len(p) >= 2 else {"pairs": len(p)}
    return out


def plot(frame: pd.DataFrame, stats: dict[str, dict], out: Path) -> None:
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, arm in enumerate(CONTRASTS):
        s = stats[arm]
        if s["pairs"] >= 2:
            m = s["mean_difference"]
            left.errorbar([m], [i], xerr=[[m - s["ci_low"]], [s["ci_high"] - m]], fmt="o", capsize=4)
    left.axvline(0, color="0.6", lw=0.8)
    for x in (-MARGIN, MARGIN):
        left.axvline(x, color="tab:red", ls="--", lw=0.8)
    left.set_yticks(range(len(CONTRASTS)), list(CONTRASTS.values()))
    left.set_xlabel("subject_accuracy difference (95% CI; dashed: ±0.05)")
    order = ["sg_off", "sg_tau43", "sg_tau128"]
    present = [a for a in order if a in set(frame.arm)]
    # the (subject, seed) keys every arm has, so that the boxes compare the same runs
    wide = frame.pivot_table(index=["subject", "seed"], columns="arm", values="subject_accuracy")[present].dropna()
    right.boxplot([wide[a] for a in present], tick_labels=present)
    right.set_ylabel("subject_accuracy (140 images a run)")
    right.set_title(f"the {len(wide)} (subject, seed) pairs every arm has", fontsize=9)
    fig.suptitle("Subspace Gradient at 10,000 steps on the toy world", fontsize=10)
    fig.savefig(out, dpi=110)


def main() -> None:
    frame = runs()
    stats = summaries(frame)
    for arm, label in CONTRASTS.items():
        s = stats[arm]
        if s["pairs"] < 2:
            print(f"{label}: {s['pairs']} pairs of {PLANNED} recorded")
            continue
        status = "" if s["pairs"] >= PLANNED else f" (interim: {s['pairs']} of {PLANNED} pairs)"
        print(
            f"{label}: pairs {s['pairs']}, mean {s['mean_difference']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
            f", p {s['t_test_p']:.3g}, detectable {s['detectable_effect']:.3f}: "
            f"{verdict(s, arm) if s['pairs'] >= FIRST_LOOK else 'no verdict yet'}{status}"
        )
    for arm, g in frame.groupby("arm"):
        mean, wall = g.subject_accuracy.mean(), g.wall_seconds.mean()
        print(f"{arm}: {len(g)} runs, subject_accuracy {mean:.3f}, wall {wall:.0f} s")
    plot(frame, stats, HERE / "sg_paper_budget.png")
    print(f"wrote {HERE / 'sg_paper_budget.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
