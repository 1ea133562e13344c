"""zoodip-compare MULTIRUN_DIR: methods at an equal budget of UNet forward passes.

The sweep it reads runs each method on the same subjects and seeds with the same `train.forward_budget`, keeping the
token every K forward passes (`train.keep_tokens_every`), e.g. `sweeps/compare_methods.yaml`. For every kept token
it measures, on the model each run trained (quantized as it was):

* subject_accuracy: the toy world's scorer on `compare.images_per_prompt` images of each evaluation prompt
  (`compare.tokens=final`: only the first and the last token of each run, e.g. to score the finals on more images);
* the pool loss L: Eq. 1's loss averaged over a fixed pool of (reference image, noise, timestep), t stratified over
  [0, T), the same pool for every run of a subject; and the fraction of the loss gap closed,
  (L_init - L) / (L_init - L_true), L_init the initializer's loss and L_true the loss of the subject's true words
  ("a red circle") in the same captions.

A method is a job's swept overrides other than `data.subject`, `train.seed` and the budget keys (`train.steps`,
`train.forward_budget`, `train.keep_tokens_every`, `train.grad_cosine_every`); with one such key, its value alone. Into
<dir>/compare/ it writes curves.csv (one row per kept token), curves.png, finals.png (each method's final
subject_accuracy against the reference's, per subject and seed), summary.csv and summary.md:

* per method: its final subject_accuracy and gap closed, forwards-to-target (the first kept token at or above the
  target: by default the reference method's mean final subject_accuracy), the speed-up over the reference per
  (subject, seed) with its median and a Wilcoxon test, the peak memory against the reference's (a method more than
  5% above it is flagged), and the mean cosine with the true gradient where the runs logged it
  (`train.grad_cosine_every`).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from scipy import stats

from zoodip.analysis.report import NUISANCE, job_dirs, paired_difference, read_metrics, read_overrides
from zoodip.cli import hydra_app, multirun_dir_main
from zoodip.data.dataset import encode_latents, load_captions, read_reference_images
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import Validator
from zoodip.io import atomic_write, atomic_write_text
from zoodip.method.objective import Objective, TextConditioner
from zoodip.models.loading import resolve_device
from zoodip.models.quantize import forward_mode
from zoodip.schema import data_settings, model_settings
from zoodip.toyworld import world as toyworld

log = logging.getLogger("zoodip.analysis.compare")
USAGE = "usage: zoodip-compare MULTIRUN_DIR [compare.reference=LABEL] [compare.target=0.76] [key=value ...]"
MEMORY_TOLERANCE = 1.05  # the memory bar: at most 5% above the reference's peak memory
#: Summary columns read off a curve; compare.tokens=final measures none, so they are left empty there.
CURVE_COLUMNS = [
    "equal_budget",
    "equal_budget_accuracy",
    "equal_budget_minus_reference",
    "equal_budget_t_p",
    "reached_target",
    "median_forwards_to_target",
    "median_speedup",
    "speedup_wilcoxon_p",
]
#: Overrides that are not part of a method: averaged over (subject, seed) or the measurement's own settings.
NOT_METHOD = (*NUISANCE, "train.forward_budget", "train.keep_tokens_every", "train.grad_cosine_every", "train.steps")


def job_label(overrides: dict[str, Any], swept: list[str]) -> str:
    """A job's method: its swept overrides other than subject and seed; one key: its value alone."""
    keys = [k for k in swept if k not in NOT_METHOD and overrides.get(k) is not None]
    if len(keys) == 1 and len([k for k in swept if k not in NOT_METHOD]) == 1:
        return str(overrides[keys[0]])
    return ",".join(f"{k}={overrides[k]}" for k in keys) or "default"


def kept_tokens(job: Path) -> list[tuple[int, torch.Tensor]]:
    """(forward passes, flat token) for every token the run kept, in order, ending with its final token (the run's
    learned_embeds.safetensors at metrics.json's forward passes, where tokens/ stops short of it)."""
    out = []
    for path in sorted((job / "tokens").glob("fwd-*.safetensors")):
        with safe_open(path, "pt") as f:
            out.append((int(f.metadata()["forward_passes"]), f.get_tensor("theta")))
    metrics = read_metrics(job / "metrics.json") or {}
    final, done = job / "learned_embeds.safetensors", metrics.get("forward_passes")
    if out and metrics.get("status") == "completed" and isinstance(done, int) and done > out[-1][0] and final.exists():
        with safe_open(final, "pt") as f:
            out.append((done, f.get_tensor(next(iter(f.keys()))).reshape(-1)))
    return out


class SubjectProbe:
    """One subject's model (as its runs trained it), scorer and fixed loss pool."""

    def __init__(self, cfg: DictConfig, pool: int, images_per_prompt: int, seed: int) -> None:
        d, model = data_settings(cfg), model_settings(cfg)
        self.subject = str(d.subject)
        self.device = resolve_device(cfg.train.device)
        self.quant = model.weights
        self.parts = model.load(self.device, torch.float32)
        # the initializer as zoodip-train chose it
        self.text = TextConditioner(self.parts, d.placeholder, d.initializer_word(), d.num_vectors)
        refs = read_reference_images(d.path, d.resolution)
        captions = load_captions(d.captions, d.subject, refs.names, refs.entries)
        if not captions:
            raise ZoodipError(f"zoodip-compare needs the runs' caption file (data.captions), none for {d.subject}")
        latents, _ = encode_latents(self.parts.vae, refs.tensor(), self.device)
        g = torch.Generator().manual_seed(seed)
        num_t = self.parts.scheduler.config.num_train_timesteps
        self.samples = []  # (z0, noise, t, caption with the placeholder, caption with the true words)
        true_words = toyworld.true_words(d.subject)
        for z0, caption in zip(latents, captions, strict=True):
            for j, u in enumerate(torch.rand(pool, generator=g, dtype=torch.float64).tolist()):
                noise = torch.randn(z0[None].shape, generator=g)
                t = min(int((j + u) * num_t / pool), num_t - 1)
                self.samples.append((z0[None], noise, t, caption.format(d.placeholder), caption.format(true_words)))
        self.objective = Objective(self.parts, self.text, batched=True, max_batch=64)
        val = OmegaConf.merge(cfg, {"eval": {"validation": {"prompts": 100, "images_per_prompt": images_per_prompt}}})
        self.validator = Validator(val, self.parts, self.text)
        self.true_loss = self.pool_losses(self.text.initial_theta()[None], true_caption=True)[0]
        self.scored: dict[bytes, float] = {}

    def pool_losses(self, thetas: torch.Tensor, true_caption: bool = False) -> list[float]:
        """Mean Eq. 1 loss over the pool for each token (rows of `thetas`)."""
        total = torch.zeros(len(thetas))
        with forward_mode(self.quant):
            for z0, noise, t, caption, truth in self.samples:
                self.objective.set_sample(z0, noise, t, truth if true_caption else caption)
                total += self.objective.losses(thetas).float().cpu()
        return (total / len(self.samples)).tolist()

    def accuracy(self, theta: torch.Tensor) -> float:
        """The scorer's subject_accuracy on the validator's fixed seeds: a token scored once is not scored again
        (every run of a subject starts from the same initializer token)."""
        key = theta.detach().float().cpu().numpy().tobytes()
        if key not in self.scored:
            with forward_mode(self.quant):
                self.scored[key] = float(self.validator(theta).metrics["val/subject_accuracy"])
        return self.scored[key]


def measure_curves(
    jobs: list[Path], labels: dict[str, str], cc: DictConfig, known: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per (job, kept token): forwards, subject_accuracy, pool loss and the fraction of the gap closed.
    Rows of `known` (an earlier curves.csv) are reused for a job whose tokens they cover, measured with the same
    settings; only the other jobs are measured."""
    settings = {"images_per_prompt": int(cc.images_per_prompt), "pool": int(cc.pool), "pool_seed": int(cc.seed)}
    rows, probe = [], None
    configs = {job.name: OmegaConf.load(job / ".hydra" / "config.yaml") for job in jobs}
    for job in jobs:
        if configs[job.name].eval.kind != "toyworld":
            raise ZoodipError(
                f"{job} is not a toy-world run: zoodip-compare scores tokens with the toy world's scorer "
                "(experiments=toyworld); compare runs of other models with zoodip-report"
            )
    for job in sorted(jobs, key=lambda j: str(configs[j.name].data.subject)):  # one model load per subject
        cfg, tokens = configs[job.name], kept_tokens(job)
        if cc.tokens == "final":  # the start (for L_init) and the end: a finer score of the finals at little cost
            tokens = tokens[:1] + tokens[1:][-1:]
        subject, seed = str(cfg.data.subject), int(cfg.train.seed)
        if not tokens:
            log.warning("%s kept no tokens (train.keep_tokens_every): left out", job)
            continue
        if known is not None and all(c in known for c in settings):
            same = known[
                (known["job"].astype(str) == job.name) & (known[list(settings)] == pd.Series(settings)).all(axis=1)
            ]
            if sorted(same["forward_passes"]) == [f for f, _ in tokens]:
                rows += same.assign(method=labels[job.name]).to_dict("records")
                continue
        if probe is None or probe.subject != subject:  # jobs come sorted by subject: one model at a time
            probe = SubjectProbe(cfg, settings["pool"], settings["images_per_prompt"], settings["pool_seed"])
        losses = probe.pool_losses(torch.stack([theta for _, theta in tokens]))
        initial = losses[0] if tokens[0][0] == 0 else math.nan
        gap = initial - probe.true_loss
        for (forwards, theta), loss in zip(tokens, losses, strict=True):
            closed = (initial - loss) / gap if gap > 0 else math.nan
            rows.append(
                {
                    "job": job.name,
                    "method": labels[job.name],
                    "subject": subject,
                    "seed": seed,
                    "forward_passes": forwards,
                    "subject_accuracy": probe.accuracy(theta),
                    "pool_loss": loss,
                    "true_caption_loss": probe.true_loss,
                    "gap_closed": closed,
                    **settings,
                }
            )
        log.info("%s %s seed %d: %d tokens measured", labels[job.name], subject, seed, len(tokens))
    return pd.DataFrame(rows)


def forwards_to(curve: pd.DataFrame, target: float) -> float:
    """The first kept token's forward passes at or above `target` subject_accuracy (inf when never reached)."""
    hit = curve[curve["subject_accuracy"] >= target - 1e-9]
    return float(hit["forward_passes"].min()) if len(hit) else math.inf


def speedup(reference: float, mine: float) -> float:
    """How many times fewer forwards `mine` needed to reach the target (inf: it needed none or the reference never
    got there; 0: it never got there)."""
    if reference == mine:
        return 1.0
    return math.inf if mine == 0 else reference / mine


def summarize(curves: pd.DataFrame, runs: pd.DataFrame, reference: str, target: float) -> pd.DataFrame:
    """Per method: finals, the accuracy at the budget every run reached, forwards-to-target, the speed-up over
    `reference` (paired by subject and seed), memory against the reference's, the true-gradient cosine."""
    groups = list(curves.groupby(["method", "subject", "seed"]))
    equal = min(float(c["forward_passes"].max()) for _, c in groups)  # the budget every run reached (its nearest
    # kept token stands for it: 2,499 and 2,502 forward passes are one budget)
    pairs = {}
    for (method, subject, seed), curve in groups:
        curve = curve.sort_values("forward_passes")
        pairs[(method, subject, seed)] = {
            "final": float(curve["subject_accuracy"].iloc[-1]),
            "gap": float(curve["gap_closed"].iloc[-1]),
            "budget": float(curve["forward_passes"].iloc[-1]),
            "to_target": forwards_to(curve, target),
            "equal": float(curve.loc[(curve["forward_passes"] - equal).abs().idxmin(), "subject_accuracy"]),
        }
    memory = runs.groupby("method")["peak_memory_bytes"].mean()
    cosine = runs.groupby("method")["grad_cosine"].mean() if "grad_cosine" in runs else pd.Series(dtype=float)
    rows = []
    for method in dict.fromkeys(curves["method"]):
        mine = {k[1:]: v for k, v in pairs.items() if k[0] == method}
        ref = {k[1:]: v for k, v in pairs.items() if k[0] == reference}
        common = sorted(set(mine) & set(ref)) if method != reference else []
        speedups = [
            speedup(ref[k]["to_target"], mine[k]["to_target"])
            for k in common
            if math.isfinite(ref[k]["to_target"]) or math.isfinite(mine[k]["to_target"])
        ]
        logs = [math.log(v) for v in speedups if 0 < v < math.inf]  # unreached pairs count in the median only
        finals = [v["final"] for v in mine.values()]
        at_final = paired_difference([mine[k]["final"] for k in common], [ref[k]["final"] for k in common])
        at_equal = paired_difference([mine[k]["equal"] for k in common], [ref[k]["equal"] for k in common])
        to_target = [v["to_target"] for v in mine.values()]
        rows.append(
            {
                "method": method,
                "runs": len(mine),
                "budget": float(np.median([v["budget"] for v in mine.values()])),
                "final_subject_accuracy": float(np.mean(finals)),
                "final_subject_accuracy_sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan,
                "final_gap_closed": float(np.nanmean([v["gap"] for v in mine.values()])),
                "accuracy_minus_reference": at_final["mean_difference"],
                "accuracy_minus_reference_wilcoxon_p": at_final["wilcoxon_p"],
                "equal_budget": equal,
                "equal_budget_accuracy": float(np.mean([v["equal"] for v in mine.values()])),
                "equal_budget_minus_reference": at_equal["mean_difference"],
                "equal_budget_t_p": at_equal["t_test_p"],
                "reached_target": int(sum(math.isfinite(v) for v in to_target)),
                "median_forwards_to_target": float(np.median(to_target)),
                "median_speedup": float(np.median(speedups)) if speedups else math.nan,
                "speedup_wilcoxon_p": float(stats.wilcoxon(logs).pvalue) if len(logs) >= 3 and any(logs) else math.nan,
                "peak_memory_bytes": float(memory.get(method, math.nan)),
                "memory_vs_reference": float(memory.get(method, math.nan) / memory.get(reference, math.nan)),
                "grad_cosine": float(cosine.get(method, math.nan)),
            }
        )
    table = pd.DataFrame(rows)
    table["memory_ok"] = table["memory_vs_reference"] <= MEMORY_TOLERANCE
    return table


def run_table(jobs: list[Path], labels: dict[str, str]) -> pd.DataFrame:
    """Per job: its method, peak memory and (when logged) mean true-gradient cosine."""
    rows = []
    for job in jobs:
        metrics = read_metrics(job / "metrics.json") or {}
        row = {
            "job": job.name,
            "method": labels[job.name],
            "status": metrics.get("status"),
            "peak_memory_bytes": metrics.get("peak_memory_bytes"),
            "forward_passes": metrics.get("forward_passes"),
        }
        history = job / "history.csv"
        if history.exists():
            frame = pd.read_csv(history)
            if "grad_cosine" in frame:
                row["grad_cosine"] = float(frame["grad_cosine"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(curves: pd.DataFrame, target: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for method, group in curves.groupby("method", sort=False):
        for ax, column in zip(axes, ("subject_accuracy", "gap_closed"), strict=True):
            stat = group.groupby("forward_passes")[column].agg(["mean", "std"]).reset_index()
            ax.plot(stat["forward_passes"], stat["mean"], marker="o", ms=3, label=str(method))
            ax.fill_between(
                stat["forward_passes"],
                stat["mean"] - stat["std"].fillna(0),
                stat["mean"] + stat["std"].fillna(0),
                alpha=0.15,
            )
    axes[0].axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.3f}")
    axes[0].set(xlabel="UNet forward passes", ylabel="subject_accuracy", title="subject accuracy (mean ± sd)")
    axes[1].set(xlabel="UNet forward passes", ylabel="(L_init - L) / (L_init - L_true)", title="loss gap closed")
    axes[0].legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_finals(final: pd.DataFrame, reference: str, path: Path) -> None:
    """Each method's final subject_accuracy against the reference's, one point per (subject, seed) (`final`: each
    run's last row of the curves): above the diagonal, the method ended ahead on that pair."""
    from matplotlib.figure import Figure

    pairs = final.pivot_table(index=["subject", "seed"], columns="method", values="subject_accuracy")
    others = [m for m in dict.fromkeys(final["method"]) if m != reference]
    if reference not in pairs or not others:
        return
    cols = min(len(others), 4)
    rows = math.ceil(len(others) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(others) :]:
        ax.set_axis_off()
    for ax, method in zip(axes, others, strict=False):
        both = pairs[[reference, method]].dropna()
        for subject, group in both.groupby(level="subject"):
            ax.scatter(group[reference], group[method], s=22, alpha=0.8, label=str(subject))
        ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--")
        ax.set(
            xlim=(-0.02, 1.02),
            ylim=(-0.02, 1.02),
            xlabel=f"{reference} (final)",
            ylabel=f"{method} (final)",
            title=f"{(both[method] > both[reference]).sum()} ahead, {(both[method] < both[reference]).sum()} "
            f"behind of {len(both)}",
        )
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)
    axes[0].legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def markdown(summary: pd.DataFrame, reference: str, target: float) -> str:
    lines = [
        f"# zoodip-compare: reference {reference}, target subject_accuracy {target:.3f}",
        "",
        "| method | runs | budget | final subject_accuracy | gap closed | final - reference (Wilcoxon p) | "
        "at equal budget | equal - reference (t p) | reached target | median forwards to target | "
        "median speed-up (Wilcoxon p) | memory / reference | grad cosine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.method} | {r.runs} | {r.budget:.0f} | {r.final_subject_accuracy:.3f} ± "
            f"{r.final_subject_accuracy_sd:.3f} | {r.final_gap_closed:.3f} | {r.accuracy_minus_reference:+.3f} "
            f"({r.accuracy_minus_reference_wilcoxon_p:.2g}) | {r.equal_budget_accuracy:.3f} @ {r.equal_budget:.0f} | "
            f"{r.equal_budget_minus_reference:+.3f} ({r.equal_budget_t_p:.2g}) | {r.reached_target}/{r.runs} | "
            f"{r.median_forwards_to_target:.0f} | {r.median_speedup:.2f} ({r.speedup_wilcoxon_p:.2g}) | "
            f"{r.memory_vs_reference:.3f}{'' if r.memory_ok else ' (over 5%)'} | {r.grad_cosine:.3f} |"
        )
    return "\n".join(lines) + "\n"


def compare(cfg: DictConfig) -> None:
    cc = cfg.compare
    if cc.tokens not in ("all", "final"):
        raise ZoodipError(f"compare.tokens must be all or final, got {cc.tokens!r}")
    jobs = [j for j in job_dirs(cfg.multirun_dir) if (j / "tokens").is_dir()]
    if not jobs:
        raise ZoodipError(f"no job in {cfg.multirun_dir} kept tokens: run the sweep with train.keep_tokens_every=K")
    overrides = {job.name: read_overrides(job) for job in jobs}
    keys = list(dict.fromkeys(k for o in overrides.values() for k in o))
    swept = [k for k in keys if len({str(o.get(k)) for o in overrides.values()}) > 1]
    labels = {job.name: job_label(overrides[job.name], swept) for job in jobs}
    reference = str(cc.reference) if cc.reference is not None else labels[jobs[0].name]
    if reference not in labels.values():
        raise ZoodipError(f"compare.reference={reference!r} is none of the methods: {', '.join(set(labels.values()))}")
    out = Path(cc.output or Path(cfg.multirun_dir) / "compare")
    known = pd.read_csv(out / "curves.csv", dtype={"job": str}) if (out / "curves.csv").is_file() and cc.reuse else None
    curves = measure_curves(jobs, labels, cc, known)
    final = curves.sort_values("forward_passes").groupby(["method", "subject", "seed"]).tail(1)
    target = (
        float(cc.target) if cc.target is not None else float(final[final.method == reference].subject_accuracy.mean())
    )
    summary = summarize(curves, run_table(jobs, labels), reference, target)
    if cc.tokens == "final":  # no curve between the start and the end: nothing to read a budget or a speed-up from
        summary[CURVE_COLUMNS] = math.nan
    atomic_write(out / "curves.csv", lambda tmp: curves.to_csv(tmp, index=False))
    atomic_write(out / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write_text(out / "summary.md", markdown(summary, reference, target))
    plot_curves(curves, target, out / "curves.png")
    plot_finals(final, reference, out / "finals.png")
    print(markdown(summary, reference, target))
    print(f"zoodip-compare: wrote {out}", file=sys.stderr)


hydra_main = hydra_app("compare", compare)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the positional MULTIRUN_DIR becomes multirun_dir=DIR, as for zoodip-report."""
    multirun_dir_main(argv, USAGE, __doc__, hydra_main)
