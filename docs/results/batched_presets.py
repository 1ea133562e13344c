"""RESULTS.md §3.1: the ZOODiP preset before and after the batched step, paired by subject and seed.

    python docs/results/batched_presets.py record BASE_SWEEP NEW_SWEEP   # sweeps -> batched_presets/runs.csv, tokens/
    python docs/results/batched_presets.py                               # runs.csv -> the table and batched_presets.png

`record` keeps what must outlive the machine: one row per run (code, subject, seed, metrics, wall time) and each
final token. The analysis reads only runs.csv.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from zoodip.analysis.report import paired_summary  # noqa: E402
from zoodip.io import read_json  # noqa: E402

HERE = Path(__file__).resolve().parent / "batched_presets"
METRICS = ["subject_accuracy", "image_similarity", "prompt_accuracy", "diversity", "final_loss"]
#: Stated before the runs: equivalence holds where the 95% interval of the paired difference lies inside +/- margin.
MARGIN = {"subject_accuracy": 0.05, "image_similarity": 0.05, "prompt_accuracy": 0.05, "diversity": 0.05}


def record(base: Path, new: Path) -> None:
    rows = []
    for code, sweep in (("baseline", base), ("batched", new)):
        for job in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
            m = read_json(job / "metrics.json")
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            o = dict(x.split("=", 1) for x in overrides if "=" in x)
            subject, seed = o["data.subject"], int(o["train.seed"])
            if m.get("status") != "completed":
                continue
            ev = m.get("eval") or {}
            rows.append(
                {
                    "code": code,
                    "subject": subject,
                    "seed": seed,
                    "steps": m["steps"],
                    "wall_seconds": round(m["wall_seconds"], 1),
                    "final_loss": m["final_loss"],
                    **{k: ev.get(k) for k in METRICS if k != "final_loss"},
                }
            )
            tokens = HERE / "tokens"
            tokens.mkdir(parents=True, exist_ok=True)
            shutil.copy(job / "learned_embeds.safetensors", tokens / f"{code}__{subject}__s{seed}.safetensors")
    frame = pd.DataFrame(rows).sort_values(["code", "subject", "seed"])
    frame.to_csv(HERE / "runs.csv", index=False)
    print(f"{len(frame)} runs -> {HERE / 'runs.csv'}")


def analyse() -> None:
    frame = pd.read_csv(HERE / "runs.csv")
    wide = frame.pivot_table(index=["subject", "seed"], columns="code", values=METRICS).dropna()
    print(f"{len(wide)} pairs (subject, seed)\n")
    print(
        "| metric | baseline | batched | difference | 95% CI | paired t p | Wilcoxon p | detectable (80%) | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for metric in METRICS:
        base, new = wide[(metric, "baseline")], wide[(metric, "batched")]
        s = paired_summary(new, base)
        margin = MARGIN.get(metric)
        verdict = "—"
        if margin is not None:
            inside = -margin < s["ci_low"] and s["ci_high"] < margin
            verdict = f"equivalent within ±{margin}" if inside else f"inconclusive at ±{margin}"
        print(
            f"| {metric} | {base.mean():.3f} | {new.mean():.3f} | {s['mean_difference']:+.4f} | "
            f"[{s['ci_low']:+.4f}, {s['ci_high']:+.4f}] | {s['t_test_p']:.2g} | {s['wilcoxon_p']:.2g} | "
            f"{s['detectable_effect']:.4f} | {verdict} |"
        )
    wall = frame.groupby("code")["wall_seconds"].agg(["mean", "min", "max"])
    print(
        "\nwall seconds per run (training): "
        + "; ".join(f"{code} mean {r['mean']:.0f}, {r['min']:.0f}-{r['max']:.0f}" for code, r in wall.iterrows())
    )
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, metric in zip(axes, ["subject_accuracy", "image_similarity"], strict=True):
        base, new = wide[(metric, "baseline")], wide[(metric, "batched")]
        ax.scatter(base, new, s=18)
        lo, hi = min(base.min(), new.min()) - 0.02, max(base.max(), new.max()) + 0.02
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
        ax.set(xlabel=f"{metric}, sequential step", ylabel=f"{metric}, batched step", xlim=(lo, hi), ylim=(lo, hi))
        ax.set_title(f"{len(base)} runs paired by subject and seed", fontsize=9)
    fig.suptitle("ZOODiP preset, 2,500 steps: before and after the batched step", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE.parent / "batched_presets.png", dpi=110)
    print(f"\n{HERE.parent / 'batched_presets.png'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"]:
        record(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        analyse()
