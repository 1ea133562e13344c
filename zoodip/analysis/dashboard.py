"""zoodip-dashboard: a W&B workspace and report for one sweep group, built with wandb-workspaces.

    zoodip-dashboard table4_tau_nu-2025-01-31_12-00-00 swept=[sg.tau,sg.nu]
    zoodip-dashboard group=x multirun_dir=outputs/multiruns/<date>/<time> save=false output=dashboard.json

Runs grouped by sweep (the jobs' W&B group), training curves, the eval tables with their images, the report run's
heatmaps and i*/tau histogram, parallel coordinates and parameter importance over the swept keys. The objects are
built offline; saving them needs network and a W&B login, and fails with one sentence otherwise (exit code 2).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.io import atomic_write_text

#: What the jobs log (zoodip/runtime/train.py, zoodip/evaluation/evaluate.py) and the report run logs
#: (zoodip/analysis/report.py).
TRAIN_CURVES = ["loss", "token_norm", "grad_norm", "projected_grad_norm", "sg_istar_over_tau"]
EVAL_IMAGES = ["eval/grid", "val/images", "pictures/loss", "pictures/istar"]
REPORT_IMAGES = ["heatmap", "bars", "istar_hist"]


@dataclass
class Dashboard:
    workspace: Any
    report: Any


def _modules() -> tuple[Any, Any]:
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise ZoodipError("zoodip-dashboard needs wandb-workspaces: pip install 'zoodip[dashboard]'") from None
    return ws, wr


def sweep_info(multirun_dir: str | Path) -> tuple[str | None, list[str]]:
    """The W&B group and the swept keys of a multirun folder, read from its jobs (zoodip/analysis/report.py)."""
    from zoodip.analysis.report import load_runs, swept_params

    runs, keys = load_runs(multirun_dir)
    groups = runs["wandb_group"].dropna().unique().tolist() if "wandb_group" in runs else []
    return (groups[0] if groups else None), swept_params(runs, keys)


def build(group: str, swept: list[str], metric: str, project: str, entity: str | None) -> Dashboard:
    """The workspace (one view of the group) and the report, as wandb-workspaces objects; nothing is sent."""
    ws, wr = _modules()
    entity = entity or ""
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in swept]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric)))
    sweep_panels = [
        wr.ParallelCoordinatesPlot(columns=columns, title=f"{metric} over the swept keys"),
        wr.ParameterImportancePlot(with_respect_to=metric),
    ]
    curves = [wr.LinePlot(title=name, x="Step", y=[name]) for name in TRAIN_CURVES]
    evaluation = [wr.WeavePanelSummaryTable(table_name="eval/samples"), wr.MediaBrowser(media_keys=EVAL_IMAGES)]
    report_images = [wr.MediaBrowser(title="zoodip-report", media_keys=REPORT_IMAGES)]
    workspace = ws.Workspace(
        entity=entity,
        project=project,
        name=f"zoodip {group}",
        sections=[
            ws.Section(name="Sweep", panels=sweep_panels, is_open=True),
            ws.Section(name="Training", panels=curves, is_open=True),
            ws.Section(name="Evaluation", panels=evaluation, is_open=True),
            ws.Section(name="Report", panels=report_images),
        ],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group], groupby=[ws.Metric("JobType")]),
    )
    runset = wr.Runset(
        entity=entity, project=project, name=group, filters=[ws.Metric("Group") == group], groupby=["JobType"]
    )
    report = wr.Report(
        project=project,
        entity=entity,
        title=f"zoodip sweep {group}",
        description="Training curves, evaluation images and the sweep's heatmaps (zoodip-dashboard).",
        blocks=[
            wr.H1(f"Sweep {group}"),
            wr.PanelGrid(runsets=[runset], panels=sweep_panels + report_images),
            wr.H2("Training"),
            wr.PanelGrid(runsets=[runset], panels=curves),
            wr.H2("Evaluation"),
            wr.PanelGrid(runsets=[runset], panels=evaluation),
        ],
    )
    return Dashboard(workspace, report)


def as_json(dashboard: Dashboard) -> str:
    """Both objects as plain JSON (their pydantic dataclasses dumped), to inspect or keep without network."""
    from pydantic import TypeAdapter

    data = {
        name: TypeAdapter(type(obj)).dump_python(obj, mode="json")
        for name, obj in (("workspace", dashboard.workspace), ("report", dashboard.report))
    }
    return json.dumps(data, indent=2, default=str) + "\n"


def save(dashboard: Dashboard) -> tuple[str, str]:
    """Send both to W&B; without network or login, one sentence (exit code 2)."""
    try:
        dashboard.workspace.save()
        dashboard.report.save()
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ZoodipError(
            f"could not save the dashboard to W&B ({reason[:200]}); it needs network and `wandb login`: "
            "rerun where W&B is reachable, or save=false output=dashboard.json to keep the objects"
        ) from None
    return dashboard.workspace.url, dashboard.report.url


def task(cfg: DictConfig) -> None:
    group, swept = str(cfg.group), list(cfg.swept)
    if cfg.multirun_dir:
        found, keys = sweep_info(str(cfg.multirun_dir))
        group, swept = (found or group), (swept or keys)
    dashboard = build(group, swept, str(cfg.metric), str(cfg.project), cfg.entity)
    if cfg.output:
        atomic_write_text(Path(str(cfg.output)).expanduser(), as_json(dashboard))
    if cfg.save:
        workspace, report = save(dashboard)
        print(f"zoodip-dashboard: workspace {workspace}\nreport {report}", file=sys.stderr)
    else:
        print(f"zoodip-dashboard: built for group {group} (save=false: nothing sent)", file=sys.stderr)


_hydra_main = hydra_app("dashboard", task)


def main() -> None:
    """`zoodip-dashboard GROUP ...`: a first argument without `=` is the sweep group."""
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        sys.argv[1] = f"group={sys.argv[1]}"
    _hydra_main()


if __name__ == "__main__":
    main()
