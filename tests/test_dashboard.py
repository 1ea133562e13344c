"""zoodip-dashboard: the W&B workspace and report are built offline; saving without W&B is one sentence, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("wandb_workspaces")

from zoodip.analysis.dashboard import as_json, build  # noqa: E402


def test_builds_workspace_and_report_offline():
    dashboard = build("table4_tau_nu-2025-01-31_12-00-00", ["sg.tau", "sg.nu"], "eval/clip_i", "zoodip", None)
    ws, report = dashboard.workspace, dashboard.report
    assert ws.name == "zoodip table4_tau_nu-2025-01-31_12-00-00" and ws.project == "zoodip"
    assert [s.name for s in ws.sections] == ["Sweep", "Training", "Evaluation", "Report"]
    sweep = {type(p).__name__: p for p in ws.sections[0].panels}
    columns = [c.metric for c in sweep["ParallelCoordinatesPlot"].columns]
    assert [getattr(c, "name", c) for c in columns] == ["sg.tau", "sg.nu", "eval/clip_i"]
    assert sweep["ParameterImportancePlot"].with_respect_to == "eval/clip_i"
    evaluation = {type(p).__name__: p for p in ws.sections[2].panels}
    assert evaluation["WeavePanelSummaryTable"].table_name == "eval/samples"
    assert "eval/grid" in evaluation["MediaBrowser"].media_keys
    assert "heatmap" in ws.sections[3].panels[0].media_keys
    assert "table4_tau_nu-2025-01-31_12-00-00" in str(ws.runset_settings.filters)  # runs of this sweep's group
    assert report.title == "zoodip sweep table4_tau_nu-2025-01-31_12-00-00" and len(report.blocks) == 6
    # the conversion `save` performs before sending anything also works offline
    assert ws._to_model() is not None and report._to_model() is not None
    data = json.loads(as_json(dashboard))
    assert data["workspace"]["name"] == ws.name and data["report"]["title"] == report.title


def test_command_line_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_CONFIG_DIR=str(tmp_path), NETRC=str(tmp_path / "netrc"), HOME=str(tmp_path), WANDB_SILENT="true")
    cmd = [sys.executable, "-m", "zoodip.analysis.dashboard", "mygroup", "swept=[sg.tau]"]
    built = subprocess.run(
        [*cmd, "save=false", f"output={tmp_path / 'd.json'}"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert built.returncode == 0, built.stderr[-2000:]
    assert json.loads((tmp_path / "d.json").read_text())["workspace"]["name"] == "zoodip mygroup"
    saved = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert saved.returncode == 2
    assert saved.stderr.strip().splitlines()[-1].startswith("error: could not save the dashboard to W&B")
