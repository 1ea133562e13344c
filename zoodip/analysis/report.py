"""zoodip-report: turn a finished Hydra multirun directory into tables, heatmaps and a markdown report.

    zoodip-report MULTIRUN_DIR [report.metrics=[clip_t,clip_i,dino]] [report.output=DIR] [logger=none|wandb]
                  [logger.mode=offline|online|disabled] [logger.project=zoodip]

A Hydra app like zoodip-train (conf/report.yaml): MULTIRUN_DIR is the override multirun_dir=DIR, `logger` the train
logger group, and a bad override is Hydra's own message with exit code 2.

Input: every subdirectory of MULTIRUN_DIR holding `.hydra/` is one job (Hydra names them 0/, 1/, ...). It has
`.hydra/overrides.yaml` and `.hydra/config.yaml`, and when it got that far `metrics.json` (training) and
`eval/metrics.json` (evaluation). `multirun.yaml` is not needed.

Output, in `<multirun dir>/report/` (all files written atomically):
  runs.csv        one row per job, columns in this order:
                    job                                  the job's directory name
                    <override keys>                      one per key in any job's overrides.yaml (`sg.tau`, ...), in
                                                         order of first appearance; a job without that override gets
                                                         the value from its .hydra/config.yaml
                    status                               completed | failed | running | missing (no metrics.json)
                    error                                the failure's text, else empty
                    steps, initial_loss, ..., planted_cosine   scalar training metrics (TRAIN_KEYS, then any other
                                                         numeric key of metrics.json); sg_istar_over_tau (a list) is
                                                         only summarised by sg_istar_over_tau_mean
                    clip_t, clip_i, dino, dino_inter     evaluation metrics (eval/metrics.json), unprefixed; for
                    subject_accuracy, ..., diversity     eval=toyworld the toy world's scores
                    wandb_project, wandb_group, wandb_run_id   the job's own W&B run, when it had one
  heatmap.png     two grid parameters: one panel per metric, rows = first parameter, cols = second.
                  `puts.t_low` x `puts.t_high` uses the Fig. 7 layout (y T_L, x T_U, cells with T_L >= T_U blank);
                  `sg.tau` x `sg.nu` the Table 4 layout (tau ascending down, nu descending across).
  bars.png        one grid parameter: one bar chart panel per metric (Tables 3, 5, S4-S8 style sweeps).
  istar_hist.png  histogram of i*/tau over all SG refreshes (Fig. 8), only when some job logged them.
  report.md       the same numbers as markdown tables (one-parameter sweeps: mean ± sd over repeats); best cell
                  bold with a star; failed cells read "failed". A one-parameter sweep repeated over seeds or
                  subjects also gets paired comparisons of each level with the first (paired t-test, Wilcoxon).
  report.json     metrics, swept and grid parameters, job counts, best value per metric with its parameters,
                  the paired comparisons.
  wandb/          the offline W&B report run (job_type=report), unless the logger is off.

Metrics: `report.metrics` if given; else clip_t, clip_i, dino when any job has eval metrics; else the toy world's
subject_accuracy, prompt_accuracy, image_similarity (eval=toyworld); else loss_ratio (the planted diagnostic) when any
job has it; else final_loss. DIRECTION says which way is better.

Grid rule. Swept = override keys whose value differs across jobs. Drop the nuisance keys (seed, train.seed,
data.subject): if one or two swept keys remain, they are the grid and each cell is the mean over the dropped ones
(e.g. seeds). Else, if only one or two keys are swept at all, they are the grid. Else: tables only, one row per job.
Only completed jobs give values; a cell with none reads "failed" if one of its jobs failed, else "running" or
"missing". Numeric axes sort numerically.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import DictConfig, OmegaConf

from zoodip.analysis.pictures import plot_istar
from zoodip.cli import hydra_app, multirun_dir_main
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import SUMMARY_KEYS
from zoodip.io import atomic_write, atomic_write_text, read_json, write_json

TRAIN_KEYS = [
    "steps",
    "initial_loss",
    "final_loss",
    "wall_seconds",
    "iters_per_second",
    "forward_passes",
    "peak_memory_bytes",
    "quantized_fraction",
    "nonfinite_steps",
    "sg_istar_over_tau_mean",
    "loss_ratio",
    "planted_cosine",
]
EVAL_KEYS = [k for k in SUMMARY_KEYS if k != "images_per_second"]
TOY_METRICS = ["subject_accuracy", "prompt_accuracy", "image_similarity"]  # eval=toyworld
# +1: higher is better, -1: lower is better, 0: reported but never ranked.
DIRECTION = {
    "clip_t": 1,
    "clip_i": 1,
    "dino": 1,
    "planted_cosine": 1,
    "iters_per_second": 1,
    "subject_accuracy": 1,
    "prompt_accuracy": 1,
    "image_similarity": 1,
    "diversity": 0,
    "final_loss": -1,
    "loss_ratio": -1,
    "dino_inter": -1,
    "wall_seconds": -1,
    "peak_memory_bytes": -1,
    "initial_loss": -1,
    "nonfinite_steps": -1,
    "steps": 0,
    "forward_passes": 0,
    "quantized_fraction": 0,
    "sg_istar_over_tau_mean": 0,
}
#: The paper's own choice of a swept key: paired tests compare every other level against it.
PAPER_CHOICE = {
    "estimator": "rge",
    "estimator.name": "rge",
    "estimator.n": 2,
    "estimator.mu": 0.001,
    "sg": "on",
    "puts": "puts",
    "puts.kind": "puts",
    "quantization": "int8",
    "method": "gradient",
}
NUISANCE = ("seed", "train.seed", "data.subject")  # averaged over when they are swept beside the grid
PUTS_PAIR = ("puts.t_low", "puts.t_high")  # Fig. 7
SG_PAIR = ("sg.tau", "sg.nu")  # Table 4
AXIS_NAMES = {"puts.t_low": "T_L", "puts.t_high": "T_U", "sg.tau": "τ", "sg.nu": "ν"}
BLANK = ("masked", "")  # labels drawn as empty cells: T_L >= T_U, or no job at that combination


# ----------------------------------------------------------------------------- reading the multirun


def _scalar(text: str) -> Any:
    """An override's value as written: int, float, or the string itself (so `1e-3` is a float, `off` a string)."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def read_overrides(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as err:
        raise ZoodipError(f"{path} is not valid YAML ({err.__class__.__name__}); fix or remove that job") from None
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+")
        if sep and not key.startswith(("~", "hydra.")):
            out[key] = _scalar(value)
    return out


def _from_config(job: Path, key: str) -> Any:
    """The value a job ran with for `key`, from its .hydra/config.yaml (for jobs that did not override it)."""
    try:
        value = OmegaConf.select(OmegaConf.load(job / ".hydra" / "config.yaml"), key)
    except Exception:  # absent file, bad YAML or an interpolation that cannot resolve here
        return None
    return value if isinstance(value, int | float | str) else None


def read_metrics(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        return {"status": "missing", "error": f"unreadable {path.name}: {err}"}
    return data if isinstance(data, dict) else {"status": "missing", "error": f"{path.name} is not a JSON object"}


def _number(value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def _job_order(path: Path) -> tuple[int, int, str]:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def job_dirs(multirun_dir: str | Path) -> list[Path]:
    """The job directories of a multirun: its subdirectories holding `.hydra/`, in job-number order."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise ZoodipError(f"multirun directory {root} does not exist")
    jobs = sorted((d for d in root.iterdir() if (d / ".hydra").is_dir()), key=_job_order)
    if not jobs:
        raise ZoodipError(f"{root} holds no job directories (subdirectories with .hydra/); is it a Hydra multirun dir?")
    return jobs


def load_runs(multirun_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per job (columns as in runs.csv, plus the `sg_istar_over_tau` lists), and the override keys."""
    jobs = job_dirs(multirun_dir)
    overrides = {job.name: read_overrides(job) for job in jobs}
    keys = list(dict.fromkeys(k for o in overrides.values() for k in o))
    rows, extra = [], []
    for job in jobs:
        row: dict[str, Any] = {"job": job.name}
        for key in keys:
            row[key] = overrides[job.name][key] if key in overrides[job.name] else _from_config(job, key)
        train = read_metrics(job / "metrics.json")
        row["status"] = "missing" if train is None else str(train.get("status") or "missing")
        row["error"] = (train or {}).get("error") or ""
        for key, value in (train or {}).items():
            if key in TRAIN_KEYS or (isinstance(value, int | float) and not isinstance(value, bool)):
                row[key] = _number(value)
                if key not in TRAIN_KEYS and key not in extra:
                    extra.append(key)
        istar = (train or {}).get("sg_istar_over_tau") or []
        row["sg_istar_over_tau"] = [float(v) for v in istar if isinstance(v, int | float) and math.isfinite(v)]
        evals = read_metrics(job / "eval" / "metrics.json") or {}
        for key in EVAL_KEYS:
            row[key] = _number(evals.get(key))
        wb = (train or {}).get("wandb") or {}
        for key in ("project", "group", "run_id"):
            row[f"wandb_{key}"] = wb.get(key) if isinstance(wb, dict) else None
        rows.append(row)
    columns = ["job", *keys, "status", "error", *TRAIN_KEYS, *extra, *EVAL_KEYS]
    columns += ["wandb_project", "wandb_group", "wandb_run_id", "sg_istar_over_tau"]
    return pd.DataFrame(rows).reindex(columns=columns), keys


# ----------------------------------------------------------------------------- choosing what to show


def swept_params(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Override keys whose value differs across jobs."""
    return [k for k in keys if df[k].astype(str).nunique() > 1]


def grid_params(swept: list[str]) -> list[str]:
    """The one or two parameters to plot (see the grid rule in the module docstring); [] means tables only."""
    real = [p for p in swept if p not in NUISANCE]
    grid = real if 1 <= len(real) <= 2 else swept if len(swept) <= 2 else []
    if len(grid) == 2 and (tuple(grid[::-1]) in (PUTS_PAIR, SG_PAIR)):
        grid = grid[::-1]  # T_L down the side, T_U across (Fig. 7); tau down, nu across (Table 4)
    return grid


def choose_metrics(df: pd.DataFrame, metrics: list[str] | str | None = None) -> list[str]:
    """`metrics` if given (checked), else eval metrics when any job has them, else loss_ratio, else final_loss."""
    if metrics:
        metrics = [metrics] if isinstance(metrics, str) else [str(m) for m in metrics]
        unknown = [m for m in metrics if m not in DIRECTION]
        if unknown:
            raise ZoodipError(f"unknown metric {unknown[0]!r} in report.metrics; known: {', '.join(DIRECTION)}")
        return metrics
    if df[["clip_t", "clip_i", "dino"]].notna().any().any():
        return ["clip_t", "clip_i", "dino"]
    if df[TOY_METRICS].notna().any().any():
        return TOY_METRICS
    return ["loss_ratio"] if df["loss_ratio"].notna().any() else ["final_loss"]


def _order(values: Any, descending: bool = False) -> list[Any]:
    """Unique values, numbers numerically (before any strings), strings alphabetically."""
    uniq = list(dict.fromkeys(values))
    nums = sorted((v for v in uniq if isinstance(v, int | float | np.number)), reverse=descending)
    return nums + sorted((v for v in uniq if v not in nums), key=str)


def aggregate(df: pd.DataFrame, params: list[str], metric: str) -> pd.DataFrame:
    """One row per combination of `params`: `value` = mean of `metric` over its completed jobs (so over any other
    swept key, e.g. seeds), `n` = how many, `jobs` = all its jobs, `label` = ok | failed | running | missing."""
    rows = []
    for key, g in df.groupby(params, dropna=False, sort=False):
        vals = g.loc[g["status"].eq("completed"), metric].astype(float)
        vals = vals[np.isfinite(vals)]
        status = set(g["status"])
        unfinished = ("failed", "preempted", "interrupted", "running")
        label = next((s for s in unfinished if s in status), "missing") if vals.empty else "ok"
        value = math.nan if vals.empty else float(vals.mean())
        sd = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        cell = dict(zip(params, key, strict=True))
        rows.append({**cell, "value": value, "sd": sd, "n": len(vals), "jobs": len(g), "label": label})
    return pd.DataFrame(rows)


def grid_table(df: pd.DataFrame, row: str, col: str, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`values` and `labels` matrices (rows x cols) of one metric. Labels: ok | failed | running | missing, "masked"
    for T_L >= T_U in the Fig. 7 layout, "" where no job ran. Table 4 layout: nu descending (1e-1 ... 1e-4)."""
    cells = aggregate(df, [row, col], metric)
    rows = _order(cells[row])
    cols = _order(cells[col], descending=(row, col) == SG_PAIR)
    values = pd.DataFrame(math.nan, index=pd.Index(rows, dtype=object), columns=pd.Index(cols, dtype=object))
    labels = pd.DataFrame("", index=values.index, columns=values.columns, dtype=object)
    for cell in cells.to_dict("records"):
        values.loc[cell[row], cell[col]] = cell["value"]
        labels.loc[cell[row], cell[col]] = cell["label"]
    if (row, col) == PUTS_PAIR:
        for r in rows:
            for c in cols:
                if isinstance(r, int | float) and isinstance(c, int | float) and r >= c:
                    values.loc[r, c], labels.loc[r, c] = math.nan, "masked"
    return values, labels


def best_of(values: pd.DataFrame | pd.Series, metric: str) -> Any:
    """Index (a (row, col) pair for a grid) of the best finite value by the metric's direction, or None."""
    finite = (values.stack() if isinstance(values, pd.DataFrame) else values).astype(float).dropna()
    if DIRECTION.get(metric, 0) == 0 or finite.empty:
        return None
    return finite.idxmax() if DIRECTION[metric] > 0 else finite.idxmin()


def best_mask(values: pd.DataFrame | pd.Series, metric: str) -> pd.DataFrame | pd.Series:
    """True where a value equals the best one (ties are all marked); all False for an unranked metric."""
    b = best_of(values, metric)
    if b is None:
        return values.notna() & False
    top = float(values.loc[b])
    return (values.astype(float) - top).abs() <= 1e-9 * max(1.0, abs(top))


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _axis(param: str) -> str:
    return f"{AXIS_NAMES[param]} ({param})" if param in AXIS_NAMES else param


def _arrow(metric: str) -> str:
    return {1: " ↑", -1: " ↓"}.get(DIRECTION.get(metric, 0), "")


# ----------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _cmap(metric: str) -> Any:
    """viridis, reversed for lower-is-better metrics, so a brighter cell is always a better one."""
    return colormaps["viridis_r" if DIRECTION.get(metric, 0) < 0 else "viridis"].with_extremes(bad="white")


def _mark_cell(ax: Any, x: float, y: float, label: str, fontsize: float) -> None:
    """A failed cell is hatched grey, a missing or running one light grey; both say so. Never drawn as a number."""
    failed = label == "failed"
    face, hatch = ("0.78", "///") if failed else ("0.92", None)
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=face, edgecolor="0.55", hatch=hatch, linewidth=0))
    ax.text(x, y, label, ha="center", va="center", fontsize=fontsize, color="0.15", style="italic")


def plot_heatmap(grids: dict[str, tuple[pd.DataFrame, pd.DataFrame]], row: str, col: str, path: Path) -> Path:
    """One panel per metric (Fig. 7: CLIP-T, CLIP-I, DINO), values in each cell, best cell boxed in red."""
    values0 = next(iter(grids.values()))[0]
    nr, nc = values0.shape
    fontsize = 8 if max(nr, nc) <= 10 else 6.5
    fig = Figure(figsize=(len(grids) * max(3.8, 0.62 * nc + 1.8), max(3.0, 0.45 * nr + 1.4)), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (metric, (values, labels)) in zip(axes, grids.items(), strict=True):
        data = np.ma.masked_invalid(values.to_numpy(dtype=float))
        lo, hi = (float(data.min()), float(data.max())) if data.count() else (0.0, 1.0)
        norm = Normalize(lo - 0.5, hi + 0.5) if lo == hi else Normalize(lo, hi)
        cmap = _cmap(metric)
        image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        best = best_mask(values, metric)
        for i in range(nr):
            for j in range(nc):
                label = labels.iat[i, j]
                if label == "ok":
                    v = values.iat[i, j]
                    rgb = cmap(norm(v))[:3]
                    dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.55
                    weight = "bold" if best.iat[i, j] else "normal"
                    ax.text(
                        j,
                        i,
                        _fmt(v),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        weight=weight,
                        color="white" if dark else "black",
                    )
                elif label not in BLANK:
                    _mark_cell(ax, j, i, label, fontsize)
                if best.iat[i, j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2))
        xlabels = [_label(c) for c in values.columns]
        ax.set_xticks(range(nc), xlabels, rotation=45 if nc * max(map(len, xlabels)) > 40 else 0)
        ax.set_yticks(range(nr), [_label(r) for r in values.index])
        ax.set_xlabel(_axis(col))
        ax.set_ylabel(_axis(row))
        ax.set_title(metric + _arrow(metric))
        ax.set_xticks(np.arange(nc + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(nr + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        if data.count():
            fig.colorbar(image, ax=ax, shrink=0.85)
    return _save(fig, path)


def plot_bars(cells: dict[str, pd.DataFrame], param: str, path: Path) -> Path:
    """One bar chart per metric over one swept parameter, with ± sd over repeats as error bars; failed/missing values
    are written in, never drawn as 0."""
    n = len(next(iter(cells.values())))
    fig = Figure(figsize=(len(cells) * max(3.6, 0.55 * n + 1.5), 3.4), layout="constrained")
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, (metric, table) in zip(axes, cells.items(), strict=True):
        best = best_mask(table["value"], metric)
        for x, (key, cell) in enumerate(table.iterrows()):
            if cell["label"] == "ok":
                color = "tab:orange" if best[key] else "tab:blue"
                sd = cell.get("sd", math.nan)
                ax.bar(
                    x,
                    cell["value"],
                    color=color,
                    edgecolor="black" if best[key] else color,
                    yerr=sd if math.isfinite(sd) else None,
                    capsize=4,
                    ecolor="0.25",
                )
                ax.annotate(
                    _fmt(cell["value"]),
                    (x, cell["value"]),
                    ha="left",
                    va="bottom",
                    fontsize=8,
                    xytext=(5, 2),
                    textcoords="offset points",
                )
            else:
                ax.text(
                    x,
                    0.03,
                    cell["label"],
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=9,
                    style="italic",
                    color="0.3",
                )
        ok = table.loc[table["label"].eq("ok"), "value"]
        spread = table.loc[table["label"].eq("ok"), "sd"].fillna(0.0) if "sd" in table else 0.0
        top = float((ok + spread).max()) if len(ok) else 1.0
        ax.set_ylim(min(0.0, float(ok.min()) * 1.1) if len(ok) else 0.0, top * 1.15 if top > 0 else 1.0)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xticks(range(n), [_label(k) for k in table.index], rotation=45 if n > 6 else 0)
        ax.set_xlabel(_axis(param))
        ax.set_title(metric + _arrow(metric))
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


def _md_cell(value: float, label: str, best: bool, sd: float = math.nan) -> str:
    """A value (± its sd over repeats, when there are several), bold with a star when it is the best."""
    if label != "ok":
        return "" if label in BLANK else label
    text = _fmt(value) + (f" ± {_fmt(sd)}" if math.isfinite(sd) else "")
    return f"**{text}** ★" if best else text


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# ----------------------------------------------------------------------------- W&B


def _most_common(values: pd.Series) -> str | None:
    found = [v for v in values if isinstance(v, str) and v]
    return Counter(found).most_common(1)[0][0] if found else None


def log_wandb(
    report_dir: Path, runs: pd.DataFrame, summary: dict[str, Any], images: list[Path], mode: str, project: str
) -> dict[str, Any]:
    """One W&B run, job_type=report, in the jobs' group: the PNGs, runs.csv as a table, best values in the summary."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    group = _most_common(runs["wandb_group"]) or Path(summary["multirun_dir"]).name
    run = wandb.init(
        project=_most_common(runs["wandb_project"]) or project,
        group=group,
        job_type="report",
        name=f"report-{Path(summary['multirun_dir']).name}",
        mode=mode,
        dir=str(report_dir),
        config={k: summary[k] for k in ("multirun_dir", "metrics", "swept", "grid", "averaged_over")},
        reinit="finish_previous",
    )
    table = runs.astype(object).where(runs.notna(), None)
    for name in table.columns:  # W&B tables want one type per column
        if any(isinstance(v, str) for v in table[name]):
            table[name] = [None if v is None else str(v) for v in table[name]]
    run.log({"runs": wandb.Table(dataframe=table), **{p.stem: wandb.Image(str(p)) for p in images}})
    for metric, best in summary["best"].items():
        run.summary[f"best/{metric}"] = best["value"]
        run.summary[f"best/{metric}/params"] = best["params"]
    for key, count in summary["counts"].items():
        run.summary[f"jobs/{key}"] = count
    info = {"project": run.project, "group": group, "run_id": run.id, "mode": mode, "dir": str(Path(run.dir).parent)}
    run.finish()
    return info


# ----------------------------------------------------------------------------- the report


def _better(metric: str) -> str:
    return {1: "higher is better", -1: "lower is better"}.get(DIRECTION[metric], "unranked")


def _heatmap_section(df: pd.DataFrame, row: str, col: str, metrics: list[str], out: Path) -> tuple[Path, str, dict]:
    """Fig. 7 / Table 4: a heatmap PNG and one markdown grid per metric."""
    grids = {m: grid_table(df, row, col, m) for m in metrics}
    image = plot_heatmap(grids, row, col, out / "heatmap.png")
    sections, best = [], {}
    for m, (values, labels) in grids.items():
        b, mark = best_of(values, m), best_mask(values, m)
        if b is not None:
            best[m] = {"value": float(values.loc[b]), "params": {row: _py(b[0]), col: _py(b[1])}}
        header = [f"{_axis(row)} \\ {_axis(col)}", *[_label(c) for c in values.columns]]
        body = [
            [_label(r), *[_md_cell(values.loc[r, c], labels.loc[r, c], mark.loc[r, c]) for c in values.columns]]
            for r in values.index
        ]
        sections.append(f"## {m}{_arrow(m)}\n\n{_md_table(header, body)}")
    return image, "\n\n".join(sections), best


def _bars_section(
    df: pd.DataFrame, param: str, metrics: list[str], out: Path
) -> tuple[Path, str, dict, list[dict[str, Any]]]:
    """One swept parameter (Tables 3, 5, S4-S8 style): a bar chart PNG and a list table, one column per metric."""
    cells = {m: aggregate(df, [param], m).set_index(param) for m in metrics}
    order = _order(cells[metrics[0]].index)
    cells = {m: t.loc[order] for m, t in cells.items()}
    image = plot_bars(cells, param, out / "bars.png")
    marks = {m: best_of(t["value"], m) for m, t in cells.items()}
    best = {
        m: {"value": float(cells[m].loc[b, "value"]), "params": {param: _py(b)}}
        for m, b in marks.items()
        if b is not None
    }
    masks = {m: best_mask(t["value"], m) for m, t in cells.items()}
    body = []
    for k in order:
        vals = [
            _md_cell(cells[m].loc[k, "value"], cells[m].loc[k, "label"], masks[m][k], cells[m].loc[k, "sd"])
            for m in metrics
        ]
        body.append([_label(k), *vals, str(cells[metrics[0]].loc[k, "jobs"])])
    header = [_axis(param), *[m + _arrow(m) for m in metrics], "jobs"]
    text = f"## {', '.join(metrics)} (mean ± sd over repeats)\n\n{_md_table(header, body)}"
    paired = paired_tests(df, param, metrics)
    return image, text + _paired_section(paired, param, "same seed and subject"), best, paired


def _paired_section(paired: list[dict[str, Any]], param: str, how: str) -> str:
    if not paired:
        return ""
    rows = [
        [
            _label(t["level"]),
            _label(t["reference"]),
            t["metric"],
            _fmt(t["mean_difference"]),
            str(t["pairs"]),
            f"{t['t_test_p']:.2g}",
            f"{t['wilcoxon_p']:.2g}",
        ]
        for t in paired
    ]
    header = [_axis(param), "vs", "metric", "mean difference", "pairs", "paired t p", "Wilcoxon p"]
    return f"\n\n## Paired comparisons of {_axis(param)} ({how})\n\n" + _md_table(header, rows)


def paired_difference(mine: Any, ref: Any) -> dict[str, float]:
    """Paired by position: the mean of mine - ref, the paired t-test's and the Wilcoxon signed-rank test's two-sided
    p-values (1 where the differences are all 0, or for the t-test do not vary; NaN below 2 pairs)."""
    from scipy import stats

    mine, ref = np.asarray(mine, dtype=float), np.asarray(ref, dtype=float)
    diff = mine - ref
    if len(diff) < 2:
        return {
            "mean_difference": float(diff.mean()) if len(diff) else math.nan,
            "t_test_p": math.nan,
            "wilcoxon_p": math.nan,
        }
    t_p = float(stats.ttest_rel(mine, ref).pvalue) if diff.std() > 0 else 1.0
    w_p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return {"mean_difference": float(diff.mean()), "t_test_p": t_p, "wilcoxon_p": w_p}


def paired_summary(mine: Any, ref: Any, power: float = 0.8, alpha: float = 0.05) -> dict[str, float]:
    """`paired_difference` and what a reviewer asks of it: the number of pairs, the two-sided (1 - alpha) t interval
    of the mean difference, and the smallest mean difference the design detects with probability `power` in a
    two-sided paired t-test at `alpha` (the differences' own sd: (t_{1-alpha/2} + t_{power}) sd / sqrt(n), n - 1
    degrees of freedom). NaN below 2 pairs."""
    from scipy import stats

    diff = np.asarray(mine, dtype=float) - np.asarray(ref, dtype=float)
    n = len(diff)
    out = {**paired_difference(mine, ref), "pairs": n}
    if n < 2:
        return {**out, "ci_low": math.nan, "ci_high": math.nan, "detectable_effect": math.nan}
    se = float(diff.std(ddof=1)) / math.sqrt(n)
    t_alpha, t_power = stats.t.ppf(1 - alpha / 2, n - 1), stats.t.ppf(power, n - 1)
    mean = float(diff.mean())
    return {
        **out,
        "ci_low": mean - t_alpha * se,
        "ci_high": mean + t_alpha * se,
        "detectable_effect": float((t_alpha + t_power) * se),
    }


def paired_verdict(
    s: dict[str, float],
    margin: float = 0.05,
    higher: str = "higher",
    lower: str = "lower",
    equivalent: str | None = None,
) -> str:
    """The two-sided rule of RESULTS.md on a `paired_summary`: a direction (`higher` / `lower`) where the 95% CI
    excludes 0, `equivalent` where it lies inside +-margin, otherwise "inconclusive", whatever the mean's sign."""
    if s["pairs"] < 2:
        return "too few pairs"
    if s["ci_low"] > 0:
        return higher
    if s["ci_high"] < 0:
        return lower
    if -margin < s["ci_low"] and s["ci_high"] < margin:
        return equivalent or f"equivalent within ±{margin}"
    return "inconclusive"


def paired_tests(
    df: pd.DataFrame, param: str, metrics: list[str], within: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Each level of `param` against the paper's choice (PAPER_CHOICE) or else its first level, paired by the
    nuisance keys (seed, subject) that the jobs differ in and by `within` (the other factor of a factorial grid
    such as Table 3's SG x PUTS): mean difference, paired t-test and Wilcoxon signed-rank p-values (two-sided).
    Empty when there is no such key or fewer than 2 pairs."""
    keys = [k for k in NUISANCE if k != param and k in df.columns and df[k].astype(str).nunique() > 1]
    keys = keys + [k for k in within if k != param] if keys else []
    done = df[df["status"].eq("completed")]
    levels = _order(done[param])
    paper = [v for v in levels if str(v) == str(PAPER_CHOICE.get(param))]
    levels = paper + [v for v in levels if v not in paper]  # compared against the paper's choice when swept
    if not keys or len(levels) < 2:
        return []
    out = []
    for metric in metrics:
        table = done.pivot_table(index=keys, columns=param, values=metric, aggfunc="mean")
        for level in levels[1:]:
            pair = table[[levels[0], level]].dropna() if level in table and levels[0] in table else table.iloc[:0]
            if len(pair) < 2:
                continue
            out.append(
                {
                    "level": _py(level),
                    "reference": _py(levels[0]),
                    "metric": metric,
                    "pairs": len(pair),
                    **paired_difference(pair[level], pair[levels[0]]),
                }
            )
    return out


def _jobs_section(runs: pd.DataFrame, swept: list[str], metrics: list[str]) -> tuple[str, dict]:
    """No grid to plot: one row per job, completed jobs' values only."""
    jobs = runs.set_index("job")
    ok = jobs[metrics].where(jobs["status"].eq("completed"), axis=0)
    marks = {m: best_of(ok[m], m) for m in metrics}
    best = {
        m: {"value": float(ok.loc[b, m]), "params": {"job": b, **{p: _py(jobs.loc[b, p]) for p in swept}}}
        for m, b in marks.items()
        if b is not None
    }
    masks = {m: best_mask(ok[m], m) for m in metrics}
    body = []
    for job, r in jobs.iterrows():
        blank = "missing" if r["status"] == "completed" else r["status"]
        vals = [_md_cell(ok.loc[job, m], "ok" if pd.notna(ok.loc[job, m]) else blank, masks[m][job]) for m in metrics]
        body.append([job, *[_label(r[p]) for p in swept], r["status"], *vals])
    header = ["job", *swept, "status", *[m + _arrow(m) for m in metrics]]
    return f"## {', '.join(metrics)}\n\n{_md_table(header, body)}", best


def _istar_section(runs: pd.DataFrame, swept: list[str], out: Path) -> tuple[Path, str, dict] | None:
    """Fig. 8: i*/tau pooled over jobs, or one series per value of a swept key with 2-5 values (data.subject first)."""
    runs = runs[runs["sg_istar_over_tau"].map(len) > 0]
    if runs.empty:
        return None
    few = [p for p in swept if 2 <= runs[p].astype(str).nunique() <= 5]
    by = "data.subject" if "data.subject" in few else few[0] if len(few) == 1 else None
    groups = runs.groupby(runs[by].astype(str)) if by else [("all jobs", runs)]
    series = {f"{by}={k}" if by else k: [v for vs in g["sg_istar_over_tau"] for v in vs] for k, g in groups}
    image = plot_istar(series, out / "istar_hist.png")
    pooled = [v for vs in series.values() for v in vs]
    info = {"refreshes": len(pooled), "jobs": len(runs), "mean": float(np.mean(pooled)), "by": by}
    text = (
        f"## i*/τ (Fig. 8)\n\n{len(pooled)} SG refreshes over {len(runs)} jobs; mean i*/τ = {info['mean']:.3f}, "
        f"so on average {1 - info['mean']:.0%} of the buffer's directions are projected out."
    )
    return image, text, info


def build_report(
    multirun_dir: str | Path,
    metrics: list[str] | str | None = None,
    wandb_mode: str = "disabled",
    output: str | Path | None = None,
    project: str = "zoodip",
) -> Path:
    """Write runs.csv, the plots, report.md and report.json for a multirun (and a W&B run unless disabled).

    Returns the report directory (`output`, default `<multirun dir>/report`)."""
    root = Path(multirun_dir).resolve()
    runs, keys = load_runs(root)
    out = Path(output) if output else root / "report"
    metrics = choose_metrics(runs, metrics)
    swept = swept_params(runs, keys)
    grid = grid_params(swept)
    averaged = [p for p in swept if p not in grid] if grid else []
    statuses = ("completed", "failed", "preempted", "interrupted", "running", "missing")
    counts = {s: int(runs["status"].eq(s).sum()) for s in statuses}
    counts["total"] = len(runs)
    atomic_write(out / "runs.csv", lambda tmp: runs.drop(columns="sg_istar_over_tau").to_csv(tmp, index=False))

    df = runs.copy()
    for p in grid:  # a job that neither overrides nor records a grid key still gets a cell
        df[p] = df[p].astype(object).where(df[p].notna(), "(unset)")
    images, sections, paired = [], [], []
    if len(grid) == 2:
        image, text, best = _heatmap_section(df, grid[0], grid[1], metrics, out)
        images.append(image)
        if set(grid) not in ({*PUTS_PAIR}, {*SG_PAIR}):  # a factorial grid (Table 3): each factor's effect, paired
            for a, b in (grid, grid[::-1]):
                tests = paired_tests(df, a, metrics, within=(b,))
                paired += tests
                text += _paired_section(tests, a, f"same {_axis(b)}, seed and subject")
    elif len(grid) == 1:
        image, text, best, paired = _bars_section(df, grid[0], metrics, out)
        images.append(image)
    else:
        text, best = _jobs_section(runs, swept, metrics)
    sections.append(text)
    for m in best:
        best[m]["direction"] = "higher" if DIRECTION[m] > 0 else "lower"
    istar = _istar_section(runs, swept, out)
    if istar:
        images.append(istar[0])
        sections.append(istar[1])
    unfinished = runs[runs["status"].ne("completed")]
    if len(unfinished):
        body = [
            [r["job"], ", ".join(f"{p}={_label(r[p])}" for p in swept), r["status"], r["error"]]
            for _, r in unfinished.iterrows()
        ]
        sections.append(f"## Jobs not completed\n\n{_md_table(['job', 'params', 'status', 'error'], body)}")

    summary = {
        "multirun_dir": str(root),
        "metrics": metrics,
        "directions": {m: DIRECTION[m] for m in metrics},
        "swept": swept,
        "grid": grid,
        "averaged_over": averaged,
        "counts": counts,
        "best": best,
        "paired": paired,
        "images": [p.name for p in images],
        "istar_over_tau": istar[2] if istar else None,
        "wandb": None,
    }
    if wandb_mode != "disabled":
        summary["wandb"] = log_wandb(out, runs.drop(columns="sg_istar_over_tau"), summary, images, wandb_mode, project)

    layout = {PUTS_PAIR: " (Fig. 7 layout)", SG_PAIR: " (Table 4 layout)"}.get(tuple(grid), "")
    mean_over = f"; each cell is the mean over {', '.join(f'`{p}`' for p in averaged)}" if averaged else ""
    head = [
        f"# Report: {root.name}",
        "",
        f"Multirun: `{root}`  ",
        f"Jobs: {counts['total']} ({counts['completed']} completed, {counts['failed']} failed, "
        + "".join(f"{counts[s]} {s}, " for s in ("preempted", "interrupted") if counts[s])
        + f"{counts['missing']} missing, {counts['running']} running)  ",
        "Swept: " + (", ".join(f"`{p}` ({runs[p].astype(str).nunique()} values)" for p in swept) or "nothing") + "  ",
        "Metrics: " + ", ".join(f"{m} ({_better(m)})" for m in metrics) + "  ",
        ("Grid: " + " x ".join(f"`{p}`" for p in grid) + layout + mean_over if grid else "Grid: none") + "  ",
        "Best value per metric in **bold** with ★; a cell with no completed job reads failed, running or missing.",
        "",
        *[f"![{p.stem}]({p.name})" for p in images],
    ]
    atomic_write_text(out / "report.md", "\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n")
    write_json(out / "report.json", summary)
    return out


# ----------------------------------------------------------------------------- command line

USAGE = "usage: zoodip-report MULTIRUN_DIR [report.metrics=[clip_t,clip_i]] [logger=none|wandb] [logger.mode=offline]"


def check_config(cfg: DictConfig) -> None:
    """The composed config's values that Hydra does not check itself."""
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ZoodipError(f"logger.mode={cfg.logger.mode} is not a W&B mode; use offline, online or disabled")


def report(cfg: DictConfig) -> None:
    """The task of the Hydra app (conf/report.yaml)."""
    check_config(cfg)
    metrics = OmegaConf.to_container(cfg.report, resolve=True)["metrics"]
    mode = "disabled" if cfg.logger.name == "none" else cfg.logger.mode
    out = build_report(cfg.multirun_dir, metrics, wandb_mode=mode, output=cfg.report.output, project=cfg.logger.project)
    print(f"report: {out / 'report.md'}")


hydra_main = hydra_app("report", report)


def main(argv: list[str] | None = None) -> None:
    """Console entry point; Hydra's own config errors (unknown key, bad override, no MULTIRUN_DIR) exit with 2."""
    multirun_dir_main(argv, USAGE, __doc__, hydra_main)


if __name__ == "__main__":
    main()
