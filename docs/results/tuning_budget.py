"""RESULTS.md §3.3, "Equal tuning budget": the two Optuna searches of hparams_search/, recorded and analysed.

    python docs/results/tuning_budget.py                                                 # table and PNG (seconds)
    python docs/results/tuning_budget.py --collect toyworld_zoodip SWEEP_DIR STORAGE_URL   # record a finished search
    python docs/results/tuning_budget.py --collect toyworld_zoodip RUN_DIR                 # record the preset's run

A search is `zoodip-train hparams_search=<search> hydra.sweep.dir=SWEEP_DIR hydra.sweeper.storage=STORAGE_URL`;
the preset's run is `zoodip-train experiments=<preset> optimized_metric=eval/subject_accuracy
tuning_subjects=[green_circle,green_triangle] hydra.run.dir=RUN_DIR`, the same objective at the preset's lr (and mu)
with the same seed. The record, docs/results/tuning_budget/trials.csv, has one row per trial and one per preset:
its parameters, state, objective and each tuning subject's subject_accuracy.

Stated before the searches ran: each method's tuning gain is its best trial's objective minus its preset's, on the
two tuning subjects. A best of 20 on two subjects is biased upwards (the winner's curse), so a gain within the
margin of the central claim (0.05) means tuning does not move that method by a margin's worth even where it was
tuned: its preset stands. A gain above the margin is not a result by itself: the tuned parameters then need a
paired check on the held-out subjects before any verdict that used the preset changes.

That check is `zoodip-study spec=tuned_paper_budget` (studies/tuned_paper_budget.yaml): ZOODiP with the search's
best (lr, mu) at the paper's budget on the central claim's twelve subjects x 3 seeds, paired with the central claim's
`zoodip` (the preset) and `ti` arms (docs/results/paper_budget/runs.csv). Stated before its runs: tuned - preset,
two-sided paired t, "tuning helps" / "hurts" where the 95% CI excludes 0, "equivalent" inside +-0.05, else
inconclusive; tuned - TI, the central claim's non-inferiority test with margin 0.05. No verdict before 12 pairs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
RECORD = HERE / "tuning_budget" / "trials.csv"
MARGIN = 0.05
SUBJECTS = ["green_circle", "green_triangle"]
SEARCHES = {"toyworld_zoodip": "ZOODiP (lr, mu)", "toyworld_ti": "first-order TI (lr)"}
PARAMS = {"optimizer.lr": "lr", "estimator.mu": "mu"}
HELD_OUT = HERE / "tuned_paper_budget" / "runs.csv"
PLANNED, FIRST_LOOK = 36, 12


def job_row(search: str, trial: str, state: str, params: dict, job: Path) -> dict:
    """One trial's (or the preset's) row: its parameters, state, objective and per-subject values and wall time."""
    row = {"search": search, "trial": trial, "state": state, "lr": None, "mu": None}
    row.update({PARAMS[k]: v for k, v in params.items() if k in PARAMS})
    objective = json.loads((job / "objective.json").read_text()) if (job / "objective.json").is_file() else {}
    row["value"] = objective.get("value")
    for subject in SUBJECTS:
        row[subject] = objective.get("by_subject", {}).get(subject)
    walls = [json.loads(p.read_text()).get("wall_seconds") or 0.0 for p in job.glob("*/metrics.json")]
    row["train_seconds"] = round(sum(walls), 1)  # training only, both subjects
    row["trial_seconds"] = None
    return row


def collect_search(search: str, sweep_dir: Path, storage: str) -> list[dict]:
    """A finished search's trials from its storage (parameters, state) and its job folders (per-subject values).

    Job folder k is trial k: one invocation of Hydra's Optuna sweeper numbers both from 0."""
    import optuna

    study = optuna.load_study(study_name=search, storage=storage)
    rows = []
    for t in study.trials:
        row = job_row(search, str(t.number), t.state.name, t.params, sweep_dir / str(t.number))
        # the whole trial, both subjects' training and evaluation
        row["trial_seconds"] = round(t.duration.total_seconds(), 1) if t.duration else None
        rows.append(row)
    return rows


def collect_preset(search: str, run_dir: Path) -> list[dict]:
    """The preset's run on the tuning subjects, its lr and mu read from the run's resolved config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / SUBJECTS[0] / ".hydra" / "config.yaml")
    params = {"optimizer.lr": float(cfg.optimizer.lr)}
    if search == "toyworld_zoodip":
        params["estimator.mu"] = float(cfg.estimator.mu)
    return [job_row(search, "preset", "COMPLETE", params, run_dir)]


def record(rows: list[dict]) -> pd.DataFrame:
    """Adds rows to the record, replacing the ones of the same (search, trial); written atomically."""
    new = pd.DataFrame(rows)
    if RECORD.is_file():
        old = pd.read_csv(RECORD, dtype={"trial": str})
        keys = set(zip(new.search, new.trial, strict=True))
        old = old[[(s, t) not in keys for s, t in zip(old.search, old.trial, strict=True)]]
        new = pd.concat([old, new], ignore_index=True)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    tmp = RECORD.with_suffix(".tmp")
    new.to_csv(tmp, index=False)
    tmp.replace(RECORD)
    return new


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per search: trials, failed, the best trial and its parameters, the preset's objective, the gain, the rule."""
    out = []
    for search, label in SEARCHES.items():
        rows = frame[frame.search == search]
        trials, preset = rows[rows.trial != "preset"], rows[rows.trial == "preset"]
        done = trials[trials.state == "COMPLETE"].dropna(subset=["value"])
        if done.empty:
            continue
        best = done.loc[done.value.idxmax()]
        preset_value = float(preset.value.iloc[0]) if len(preset) else float("nan")
        gain = float(best.value) - preset_value
        if preset.empty:
            rule = "no preset run recorded"
        elif gain <= MARGIN:
            rule = f"gain within {MARGIN}: the preset stands"
        else:
            rule = f"gain above {MARGIN}: check the tuned parameters on held-out subjects"
        out.append(
            {
                "search": label,
                "trials": len(trials),
                "failed": int((trials.state != "COMPLETE").sum()),
                "best_trial": best.trial,
                "best_lr": best.lr,
                "best_mu": best.mu,
                "best_value": float(best.value),
                "preset_lr": float(preset.lr.iloc[0]) if len(preset) else float("nan"),
                "preset_mu": float(preset.mu.iloc[0]) if len(preset) else float("nan"),
                "preset_value": preset_value,
                "gain": gain,
                "median_trial": float(done.value.median()),
                "hours": float(trials.trial_seconds.sum()) / 3600,
                "rule": rule,
            }
        )
    return pd.DataFrame(out)


def verdict(s: dict, ref: str) -> str:
    """The rules stated before the held-out runs: non-inferiority against TI, a two-sided test against the preset."""
    if ref == "ti":
        # beside this file: the central claim's own test, with its margin
        import paper_budget

        return paper_budget.verdict(s)
    from zoodip.analysis.report import paired_verdict

    return paired_verdict(s, MARGIN, "tuning helps", "tuning hurts")


def held_out() -> dict[str, dict]:
    """The tuned arm against the central claim's preset and TI arms, paired by (subject, seed), with the verdicts."""
    from zoodip.analysis.report import paired_summary

    if not HELD_OUT.is_file():
        return {}
    frame = pd.concat([pd.read_csv(HERE / "paper_budget" / "runs.csv"), pd.read_csv(HELD_OUT)])
    wide = frame.pivot_table(index=["subject", "seed"], columns="arm", values="subject_accuracy")
    out = {}
    for ref, label in (("zoodip", "tuned - preset ZOODiP"), ("ti", "tuned ZOODiP - TI")):
        pairs = wide[["zoodip_tuned", ref]].dropna()
        s = paired_summary(pairs["zoodip_tuned"], pairs[ref]) if len(pairs) >= 2 else {"pairs": len(pairs)}
        s["verdict"] = verdict(s, ref) if s["pairs"] >= FIRST_LOOK else f"no verdict before {FIRST_LOOK} pairs"
        if FIRST_LOOK <= s["pairs"] < PLANNED:
            s["verdict"] += f" (interim: {s['pairs']} of {PLANNED} pairs)"
        out[label] = s
    return out


def figure(frame: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    zo = frame[(frame.search == "toyworld_zoodip") & (frame.trial != "preset")].dropna(subset=["value"])
    zo_preset = frame[(frame.search == "toyworld_zoodip") & (frame.trial == "preset")]
    if len(zo):
        points = left.scatter(zo.lr, zo.mu, c=zo.value, cmap="viridis", s=60, edgecolor="k")
        fig.colorbar(points, ax=left, label="objective (subject_accuracy, 2 subjects)")
        best = zo.loc[zo.value.idxmax()]
        left.scatter([best.lr], [best.mu], s=220, facecolors="none", edgecolors="red", lw=1.5, label="best trial")
    if len(zo_preset):
        left.scatter(zo_preset.lr, zo_preset.mu, marker="*", s=260, c="red", label="preset", zorder=3)
        left.legend(loc="lower left")
    left.set(xscale="log", yscale="log", xlabel="lr", ylabel="mu", title="ZOODiP: the 20 trials in (lr, mu)")
    colors = {"toyworld_zoodip": "tab:blue", "toyworld_ti": "tab:orange"}
    for search, label in SEARCHES.items():
        rows = frame[(frame.search == search) & (frame.trial != "preset")].dropna(subset=["value"])
        right.scatter(rows.lr, rows.value, color=colors[search], label=f"{label}: trials", s=40)
        preset = frame[(frame.search == search) & (frame.trial == "preset")]
        if len(preset):
            right.scatter(preset.lr, preset.value, color=colors[search], marker="*", s=260, edgecolor="k")
            right.axhline(float(preset.value.iloc[0]), color=colors[search], ls=":", lw=1)
    right.set(xscale="log", xlabel="lr", ylabel="objective", title="objective against lr (stars: the presets)")
    right.legend(loc="lower left", fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--collect"]:
        if len(argv) not in (3, 4) or argv[1] not in SEARCHES:
            print(f"usage: --collect {{{','.join(SEARCHES)}}} SWEEP_DIR STORAGE_URL | RUN_DIR", file=sys.stderr)
            return 2
        if len(argv) == 4:
            rows = collect_search(argv[1], Path(argv[2]), argv[3])
        else:
            rows = collect_preset(argv[1], Path(argv[2]))
        record(rows)
        print(f"recorded {len(rows)} row(s) of {argv[1]} in {RECORD}")
        return 0
    if not RECORD.is_file():
        print(f"no record at {RECORD}: run the searches and --collect them first", file=sys.stderr)
        return 2
    frame = pd.read_csv(RECORD, dtype={"trial": str})
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(summary(frame).T.to_string(header=False))
    for label, s in held_out().items():
        if s["pairs"] < 2:
            print(f"{label}: {s['pairs']} pairs of {PLANNED}")
            continue
        print(
            f"{label}: pairs {s['pairs']}, mean {s['mean_difference']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
            f", p {s['t_test_p']:.3g}, detectable {s['detectable_effect']:.3f}: {s['verdict']}"
        )
    figure(frame, HERE / "tuning_budget.png")
    print(f"wrote {HERE / 'tuning_budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
