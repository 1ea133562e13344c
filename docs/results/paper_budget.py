"""RESULTS.md, "The central claim at the paper's budget": the record of `zoodip-study spec=paper_budget`, analysed.

    python docs/results/paper_budget.py               # statistics and paper_budget.png from the record (seconds)
    python docs/results/paper_budget.py --controls    # + TI's tokens and the true words scored on the INT8 world
    python docs/results/paper_budget.py --curves      # + the kept tokens of seed 0 scored along training (curves)

The scores the options compute are recorded beside the runs (controls.csv, curves.csv) and skipped when recorded,
so each option can be run again, on any machine, to go on. The test was stated before the runs
(studies/paper_budget.yaml): non-inferiority of ZOODiP to first-order TI on subject_accuracy with margin 0.05, the
paired 95% t interval of mean(ZOODiP - TI) over (subject, seed) pairs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from safetensors.torch import load_file

from zoodip import CONF_DIR
from zoodip.analysis.report import paired_summary
from zoodip.evaluation.evaluate import evaluate_toyworld, prepare_config
from zoodip.schema import model_settings
from zoodip.toyworld.world import true_words

HERE = Path(__file__).resolve().parent
RECORD = HERE / "paper_budget"
MARGIN = 0.05
ARMS = {"zoodip": ["experiments=toyworld"], "ti": ["experiments=toyworld_ti"], "zoodip_fp": ["experiments=toyworld"]}
QUANT = {"zoodip": "int8", "ti": "none", "zoodip_fp": "none"}


def verdict(s: dict) -> str:
    """The stated test: the claim holds where the CI's lower end lies above -MARGIN, not where its upper end does."""
    if s["pairs"] < 2:
        return "too few pairs"
    if s["ci_low"] > -MARGIN:
        return "holds (non-inferior)"
    if s["ci_high"] < -MARGIN:
        return "does not hold (inferior)"
    return "inconclusive"


def equivalence(s: dict) -> str:
    """INT8 against fp32 for ZOODiP: equivalent where the whole CI lies inside +-MARGIN."""
    if s["ci_low"] > -MARGIN and s["ci_high"] < MARGIN:
        return f"equivalent within ±{MARGIN}"
    return "lower" if s["ci_high"] < 0 else "higher" if s["ci_low"] > 0 else "inconclusive"


def pairs(runs: pd.DataFrame, a: str, b: str, metric: str = "subject_accuracy") -> pd.DataFrame:
    wide = runs.pivot_table(index=["subject", "seed"], columns="arm", values=metric)
    return wide[[a, b]].dropna() if {a, b} <= set(wide.columns) else pd.DataFrame(columns=[a, b])


def config(subject: str, quantization: str, images: int, extra: list[str] = ()):
    overrides = ["experiments=toyworld", "logger=none", f"data.subject={subject}", f"quantization={quantization}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, *extra])
    return prepare_config(cfg, {"eval.images_per_prompt": images})


def score(subject: str, rows: torch.Tensor, quantization: str, images: int) -> dict:
    """The toy world's evaluation of a token ((k, d) rows) on the world quantized as `quantization`."""
    cfg = config(subject, quantization, images, [f"data.num_vectors={rows.shape[0]}"])
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate_toyworld(Path(tmp), cfg, embeddings=[rows.float()])


def true_word_rows(subject: str) -> torch.Tensor:
    """The embeddings of the subject's own words with their article ("a red circle", three rows): the token that is
    right by construction. The placeholder stands where the captions say "a red circle", so the prompts these rows
    make are word for word the prompts of §2's subject check; without the article ("a photo of red circle") the
    world draws the subject far less often."""
    parts = model_settings(config(subject, "none", 1)).load(torch.device("cpu"))
    tokenizer, encoder = parts.tokenizers[0], parts.text_encoders[0]
    ids = tokenizer(true_words(subject), add_special_tokens=False).input_ids
    return encoder.get_input_embeddings().weight[ids].detach().float()


def controls(runs: pd.DataFrame, images: int = 20) -> pd.DataFrame:
    path = RECORD / "controls.csv"
    done = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["kind", "subject", "seed"])
    have = {(r.kind, r.subject, int(r.seed)) for r in done.itertuples()}
    todo = [("ti_on_int8", r.subject, int(r.seed)) for r in runs[runs.arm == "ti"].itertuples()]
    todo += [("true_words_int8", s, -1) for s in sorted(runs.subject.unique())]
    todo += [("true_words_fp32", s, -1) for s in sorted(runs.subject.unique())]
    for kind, subject, seed in todo:
        if (kind, subject, seed) in have:
            continue
        if kind == "ti_on_int8":
            (rows,) = load_file(RECORD / "tokens" / f"ti__{subject}__s{seed}.safetensors").values()
        else:
            rows = true_word_rows(subject)
        m = score(subject, rows.reshape(-1, rows.shape[-1]), "none" if kind.endswith("fp32") else "int8", images)
        row = {
            "kind": kind,
            "subject": subject,
            "seed": seed,
            **{k: m[k] for k in ("subject_accuracy", "prompt_accuracy")},
        }
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        done.to_csv(path, index=False)
        print(f"{kind} {subject} s{seed}: subject_accuracy {row['subject_accuracy']:.3f}", file=sys.stderr)
    return done


def curves(runs: pd.DataFrame, images: int = 5, seeds: tuple[int, ...] = (0,)) -> pd.DataFrame:
    path = RECORD / "curves.csv"
    done = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["arm", "subject", "seed", "forward_passes"])
    have = {(r.arm, r.subject, int(r.seed), int(r.forward_passes)) for r in done.itertuples()}
    for r in runs[runs.seed.isin(seeds)].itertuples():
        for kept in sorted((RECORD / "tokens" / f"{r.arm}__{r.subject}__s{r.seed}").glob("fwd-*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(kept), "pt") as f:
                meta, theta = f.metadata(), f.get_tensor("theta")
            key = (r.arm, r.subject, int(r.seed), int(meta["forward_passes"]))
            if key in have:
                continue
            m = score(r.subject, theta.reshape(1, -1), QUANT[r.arm], images)
            row = dict(zip(["arm", "subject", "seed", "forward_passes"], key, strict=True))
            row.update(step=int(meta["step"]), wall_seconds=float(meta["wall_seconds"]))
            row["subject_accuracy"] = m["subject_accuracy"]
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(path, index=False)
            print(f"curve {key}: {row['subject_accuracy']:.3f}", file=sys.stderr)
    return done


def plot(runs: pd.DataFrame, curve: pd.DataFrame | None, out: Path) -> None:
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    ax = axes[0]
    for i, (a, b) in enumerate((("zoodip", "ti"), ("zoodip_fp", "ti"), ("zoodip", "zoodip_fp"))):
        p = pairs(runs, a, b)
        if len(p) >= 2:
            s = paired_summary(p[a], p[b])
            ax.errorbar(
                [s["mean_difference"]],
                [i],
                xerr=[[s["mean_difference"] - s["ci_low"]], [s["ci_high"] - s["mean_difference"]]],
                fmt="o",
                capsize=4,
            )
    ax.axvline(0, color="0.6", lw=0.8)
    ax.axvline(-MARGIN, color="tab:red", ls="--", lw=0.8, label="margin -0.05")
    ax.set_yticks(range(3), ["ZOODiP - TI", "ZOODiP fp32 - TI", "INT8 - fp32 (ZOODiP)"])
    ax.set_xlabel("subject_accuracy difference (95% CI)")
    ax.legend(fontsize=8)
    if curve is not None and len(curve):
        for col, ax, label in (
            ("forward_passes", axes[1], "UNet forward passes"),
            ("wall_seconds", axes[2], "training wall time (s)"),
        ):
            for arm, g in curve.groupby("arm"):
                # a log axis has no 0: the initializer's point (forward passes 0) is on the wall-time panel only
                g = g[g.forward_passes > 0] if col == "forward_passes" else g
                mean = g.groupby(col)["subject_accuracy"].mean() if col == "forward_passes" else None
                if mean is None:
                    binned = g.assign(x=g.groupby(["subject", "seed"]).cumcount())
                    mean = binned.groupby("x").agg(t=(col, "mean"), a=("subject_accuracy", "mean")).set_index("t")["a"]
                ax.plot(mean.index, mean.values, marker=".", label=arm)
            ax.set_xlabel(label)
            ax.set_ylabel("subject_accuracy (35 images, seed 0)")
            ax.set_xscale("log" if col == "forward_passes" else "linear")
            ax.legend(fontsize=8)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controls", action="store_true")
    parser.add_argument("--curves", action="store_true")
    args = parser.parse_args()
    runs = pd.read_csv(RECORD / "runs.csv")
    for a, b in (("zoodip", "ti"), ("zoodip_fp", "ti"), ("zoodip", "zoodip_fp")):
        p = pairs(runs, a, b)
        s = paired_summary(p[a], p[b]) if len(p) else {"pairs": 0}
        if s["pairs"] >= 2:
            print(
                f"{a} - {b}: pairs {s['pairs']}, mean {s['mean_difference']:+.3f} "
                f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], p {s['t_test_p']:.3g}, "
                f"detectable {s['detectable_effect']:.3f}: {verdict(s) if b == 'ti' else equivalence(s)}"
            )
    for arm, g in runs.groupby("arm"):
        print(
            f"{arm}: {len(g)} runs, subject_accuracy {g.subject_accuracy.mean():.3f}, "
            f"wall {g.wall_seconds.mean():.0f} s, forward passes {g.forward_passes.mean():.0f}"
        )
    if args.controls:
        c = controls(runs)
        for kind, g in c.groupby("kind"):
            print(f"{kind}: {len(g)} scored, subject_accuracy {g.subject_accuracy.mean():.3f}")
        ti8 = c[c.kind == "ti_on_int8"].set_index(["subject", "seed"])["subject_accuracy"]
        p = pairs(runs, "zoodip", "ti").join(ti8.rename("ti_int8"), how="inner")
        if len(p) >= 2:
            s = paired_summary(p["zoodip"], p["ti_int8"])
            print(
                f"zoodip - ti scored on INT8: pairs {s['pairs']}, mean {s['mean_difference']:+.3f} "
                f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], p {s['t_test_p']:.3g}: {verdict(s)}"
            )
    curve = (
        curves(runs)
        if args.curves
        else (pd.read_csv(RECORD / "curves.csv") if (RECORD / "curves.csv").is_file() else None)
    )
    plot(runs, curve, HERE / "paper_budget.png")
    print(f"wrote {HERE / 'paper_budget.png'}", file=sys.stderr)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
