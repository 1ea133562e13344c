"""RESULTS.md §4.2: Table S4 on the toy world from the study's record (zoodip-study spec=tableS4_estimators).

    python docs/results/tableS4_estimators.py     # tableS4_estimators/runs.csv -> the table and tableS4_estimators.png

Each estimator against RGE, paired by (subject, seed), on the pairs recorded so far.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from zoodip.analysis.report import paired_summary  # noqa: E402

HERE = Path(__file__).resolve().parent / "tableS4_estimators"
METRICS = ["subject_accuracy", "image_similarity", "final_loss"]
#: Stated before the RGE arm was recorded: a difference is "worse"/"better" where its 95% interval excludes 0,
#: "equivalent" where it lies inside +/- 0.05 (accuracy and similarity), "inconclusive" otherwise.
MARGIN = 0.05


def verdict(s: dict[str, float], metric: str) -> str:
    if metric == "final_loss":
        return "—"
    if s["ci_high"] < 0:
        return "worse than RGE"
    if s["ci_low"] > 0:
        return "better than RGE"
    if s["ci_low"] > -MARGIN and s["ci_high"] < MARGIN:
        return f"equivalent within ±{MARGIN}"
    return "inconclusive"


def main() -> None:
    frame = pd.read_csv(HERE / "runs.csv")
    wide = frame.pivot_table(index=["subject", "seed"], columns="arm", values=METRICS)
    arms = [a for a in ("one_point", "spsa") if ("subject_accuracy", a) in wide.columns]
    print(
        "| estimator - RGE | metric | pairs | estimator | RGE | difference | 95% CI | t p | Wilcoxon p | "
        "detectable (80%) | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arm in arms:
        for metric in METRICS:
            pair = wide[[(metric, arm), (metric, "rge")]].dropna()
            if len(pair) < 2:
                continue
            mine, ref = pair[(metric, arm)], pair[(metric, "rge")]
            s = paired_summary(mine, ref)
            print(
                f"| {arm} | {metric} | {s['pairs']} | {mine.mean():.3f} | {ref.mean():.3f} | "
                f"{s['mean_difference']:+.3f} | [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] | {s['t_test_p']:.2g} | "
                f"{s['wilcoxon_p']:.2g} | {s['detectable_effect']:.3f} | {verdict(s, metric)} |"
            )
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, arm in enumerate(["rge", *arms]):
        values = frame[frame["arm"] == arm]["subject_accuracy"]
        ax.scatter([i] * len(values), values, alpha=0.6, s=16)
        ax.errorbar([i + 0.15], [values.mean()], yerr=[values.std()], fmt="o", color="black", capsize=3)
    ax.set_xticks(range(len(arms) + 1), ["rge", *arms])
    ax.set(ylabel="subject_accuracy", title="Table S4 on the toy world: 1,000 steps, n = 2")
    fig.tight_layout()
    fig.savefig(HERE.parent / "tableS4_estimators.png", dpi=110)
    print(f"\n{HERE.parent / 'tableS4_estimators.png'}")


if __name__ == "__main__":
    main()
