"""zoodip-report on hand-made multirun directories (Hydra layout: <dir>/<job>/.hydra/overrides.yaml, metrics.json)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from zoodip.analysis.report import (
    build_report,
    grid_table,
    load_runs,
    main,
    paired_difference,
    paired_summary,
    paired_verdict,
)


def make_job(root: Path, name: str, overrides: dict, train: dict | None = None, evals: dict | None = None) -> Path:
    """One Hydra job dir; `train` is written as metrics.json (status completed unless given), `evals` as eval/."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    config: dict = {}
    for key, value in overrides.items():
        group, leaf = key.split(".")
        config.setdefault(group, {})[leaf] = value
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if train is not None:
        (job / "metrics.json").write_text(json.dumps({"status": "completed", "error": None, **train}))
    if evals is not None:
        (job / "eval").mkdir()
        (job / "eval" / "metrics.json").write_text(json.dumps({**evals, "num_images": 4}))
    return job


def section(md: str, title: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table under `## title`."""
    block = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


def png_ok(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert 200 < w < 6000 and 150 < h < 4000, (w, h)
    return w, h


EVAL = {"clip_t": 0.25, "clip_i": 0.70, "dino": 0.50, "dino_inter": 0.30}


@pytest.fixture
def grid2x2(tmp_path: Path) -> Path:
    """estimator.mu x optimizer.lr; best clip_i at (mu=0.01, lr=0.005), best (lowest) dino_inter at (0.001, 0.001)."""
    clip_i = {(0.001, 0.001): 0.71, (0.001, 0.005): 0.74, (0.01, 0.001): 0.72, (0.01, 0.005): 0.80}
    for n, ((mu, lr), ci) in enumerate(clip_i.items()):
        evals = {**EVAL, "clip_i": ci, "dino_inter": 0.2 + ci / 10}
        make_job(tmp_path, str(n), {"estimator.mu": mu, "optimizer.lr": lr}, {"final_loss": 0.1}, evals)
    return tmp_path


def test_grid_heatmap_table_and_best(grid2x2: Path) -> None:
    out = build_report(grid2x2, metrics=["clip_i", "dino_inter"])
    assert out == grid2x2.resolve() / "report"
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4
    assert {"job", "estimator.mu", "optimizer.lr", "status", "error", "final_loss", "clip_i", "dino"} <= set(runs)
    assert list(runs.columns[:3]) == ["job", "estimator.mu", "optimizer.lr"]
    assert (runs["status"] == "completed").all()
    assert runs.set_index(["estimator.mu", "optimizer.lr"]).loc[(0.01, 0.005), "clip_i"] == pytest.approx(0.80)
    png_ok(out / "heatmap.png")

    md = (out / "report.md").read_text()
    rows = section(md, "clip_i")
    assert rows[0] == ["estimator.mu \\ optimizer.lr", "0.001", "0.005"]
    assert rows[1] == ["0.001", "0.710", "0.740"]
    assert rows[2] == ["0.01", "0.720", "**0.800** ★"]  # higher is better
    rows = section(md, "dino_inter")
    assert rows[1][1] == "**0.271** ★" and "★" not in "".join(rows[2])  # lower is better
    assert md.count("★") == 2 + 1  # one best per metric, plus the legend line
    assert "Jobs: 4 (4 completed, 0 failed, 0 missing" in md
    assert "![heatmap](heatmap.png)" in md

    summary = json.loads((out / "report.json").read_text())
    assert summary["swept"] == ["estimator.mu", "optimizer.lr"] and summary["metrics"] == ["clip_i", "dino_inter"]
    assert summary["best"]["clip_i"]["params"] == {"estimator.mu": 0.01, "optimizer.lr": 0.005}
    assert summary["best"]["dino_inter"]["params"] == {"estimator.mu": 0.001, "optimizer.lr": 0.001}
    assert summary["counts"] == {
        "total": 4,
        "completed": 4,
        "failed": 0,
        "preempted": 0,
        "interrupted": 0,
        "running": 0,
        "missing": 0,
    }


def test_failed_and_missing_jobs(grid2x2: Path) -> None:
    (grid2x2 / "3" / "metrics.json").write_text(json.dumps({"status": "failed", "error": "CUDA out of memory"}))
    (grid2x2 / "2" / "metrics.json").unlink()
    out = build_report(grid2x2)
    runs = pd.read_csv(out / "runs.csv", keep_default_na=False).set_index("job")
    assert runs.loc[3, "status"] == "failed" and runs.loc[3, "error"] == "CUDA out of memory"
    assert runs.loc[2, "status"] == "missing"
    rows = section((out / "report.md").read_text(), "clip_i")
    assert rows[2] == ["0.01", "missing", "failed"]  # never a 0
    assert rows[1] == ["0.001", "0.710", "**0.740** ★"]
    md = (out / "report.md").read_text()
    assert "CUDA out of memory" in md and "2 completed, 1 failed, 1 missing" in md
    png_ok(out / "heatmap.png")


def test_all_failed_grid(tmp_path: Path) -> None:
    for n, (a, b) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
        make_job(tmp_path, str(n), {"sg.tau": a, "sg.nu": b}, {"status": "failed", "error": "boom"})
    out = build_report(tmp_path)
    png_ok(out / "heatmap.png")
    summary = json.loads((out / "report.json").read_text())
    assert summary["best"] == {} and summary["counts"]["failed"] == 4
    assert summary["metrics"] == ["final_loss"]
    rows = section((out / "report.md").read_text(), "final_loss")
    assert [r[1:] for r in rows[1:]] == [["failed", "failed"], ["failed", "failed"]]


def test_puts_grid_masks_low_ge_high(tmp_path: Path) -> None:
    """Fig. 7: T_L down the side, T_U across, T_L >= T_U blank (those jobs fail config validation), not 'failed'."""
    n = 0
    for high in (900, 500, 700):  # t_high given first and out of order
        for low in (300, 700, 500):
            train = {"status": "failed", "error": "t_low must be < t_high"} if low >= high else {"final_loss": 1.0}
            make_job(tmp_path, str(n), {"puts.t_high": high, "puts.t_low": low}, train, {**EVAL, "dino": low / 1000})
            n += 1
    values, labels = grid_table(load_runs(tmp_path)[0], "puts.t_low", "puts.t_high", "dino")
    assert list(values.index) == [300, 500, 700] and list(values.columns) == [500, 700, 900]
    assert labels.loc[500, 500] == labels.loc[700, 500] == labels.loc[700, 700] == "masked"
    assert labels.loc[300, 500] == labels.loc[500, 900] == "ok" and values.loc[500, 900] == pytest.approx(0.5)

    out = build_report(tmp_path)
    md = (out / "report.md").read_text()
    rows = section(md, "dino")
    assert rows[0][0].startswith("T_L") and "T_U" in rows[0][0]
    assert rows[1:] == [
        ["300", "0.300", "0.300", "0.300"],
        ["500", "", "0.500", "0.500"],
        ["700", "", "", "**0.700** ★"],
    ]
    assert "Fig. 7 layout" in md
    png_ok(out / "heatmap.png")


def test_sg_grid_orders_tau_up_and_nu_down(tmp_path: Path) -> None:
    """Table 4: tau ascending (numerically: 32 < 128), nu descending 1e-1 ... 1e-4."""
    n = 0
    for tau in (128, 32, 64):
        for nu in ("1e-3", "1e-1", "1e-4", "1e-2"):
            make_job(tmp_path, str(n), {"sg.nu": nu, "sg.tau": tau}, {"final_loss": 1.0}, EVAL)
            n += 1
    rows = section((build_report(tmp_path) / "report.md").read_text(), "clip_i")
    assert rows[0][1:] == ["0.1", "0.01", "0.001", "0.0001"]
    assert [r[0] for r in rows[1:]] == ["32", "64", "128"]


def test_one_parameter_bar_chart(tmp_path: Path) -> None:
    for n, kind in enumerate(["uniform", "snr", "puts"]):
        train = {"status": "failed", "error": "nan"} if kind == "snr" else {"final_loss": 1.0}
        make_job(tmp_path, str(n), {"puts.kind": kind}, train, {**EVAL, "dino": 0.5 + n / 10, "clip_t": 0.2 + n / 100})
    out = build_report(tmp_path)
    png_ok(out / "bars.png")
    assert not (out / "heatmap.png").exists()
    rows = section((out / "report.md").read_text(), "clip_t, clip_i, dino")
    assert rows[0] == ["puts.kind", "clip_t ↑", "clip_i ↑", "dino ↑", "jobs"]
    assert rows[1:] == [
        ["puts", "**0.220** ★", "**0.700** ★", "**0.700** ★", "1"],
        ["snr", "failed", "failed", "failed", "1"],
        ["uniform", "0.200", "**0.700** ★", "0.500", "1"],  # ties are all marked
    ]


def test_metric_fallback(tmp_path: Path) -> None:
    for n, tau in enumerate((32, 64)):
        make_job(tmp_path / "a", str(n), {"sg.tau": tau}, {"final_loss": 2.0 - n, "loss_ratio": 0.5 + n})
        make_job(tmp_path / "b", str(n), {"sg.tau": tau}, {"final_loss": 2.0 - n})
    a = json.loads((build_report(tmp_path / "a") / "report.json").read_text())
    b = json.loads((build_report(tmp_path / "b") / "report.json").read_text())
    assert a["metrics"] == ["loss_ratio"] and a["best"]["loss_ratio"]["params"] == {"sg.tau": 32}
    assert b["metrics"] == ["final_loss"] and b["best"]["final_loss"]["params"] == {"sg.tau": 64}
    assert b["best"]["final_loss"]["direction"] == "lower"


def test_seeds_are_averaged_over(tmp_path: Path) -> None:
    n = 0
    for tau in (32, 64):
        for nu in (0.1, 0.01):
            for seed in (0, 1):
                evals = {**EVAL, "clip_i": 0.7 + seed / 10 + (tau == 64) / 100}
                make_job(tmp_path, str(n), {"sg.tau": tau, "sg.nu": nu, "train.seed": seed}, {"final_loss": 1}, evals)
                n += 1
    out = build_report(tmp_path)
    summary = json.loads((out / "report.json").read_text())
    assert summary["grid"] == ["sg.tau", "sg.nu"] and summary["averaged_over"] == ["train.seed"]
    assert section((out / "report.md").read_text(), "clip_i")[1][1:] == ["0.750", "0.750"]
    assert len(pd.read_csv(out / "runs.csv")) == 8


def test_istar_histogram_only_with_sg_data(tmp_path: Path) -> None:
    for n, subject in enumerate(("dog6", "shiny_sneaker")):
        make_job(tmp_path / "on", str(n), {"data.subject": subject}, {"sg_istar_over_tau": [0.1, 0.2, 0.15 * n]})
        make_job(tmp_path / "off", str(n), {"data.subject": subject}, {"sg_istar_over_tau": []})
    on, off = build_report(tmp_path / "on"), build_report(tmp_path / "off")
    png_ok(on / "istar_hist.png")
    assert "![istar_hist](istar_hist.png)" in (on / "report.md").read_text()
    info = json.loads((on / "report.json").read_text())["istar_over_tau"]
    assert info["refreshes"] == 6 and info["by"] == "data.subject"
    assert not (off / "istar_hist.png").exists()
    assert json.loads((off / "report.json").read_text())["istar_over_tau"] is None


def test_cli(grid2x2: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(grid2x2), "report.metrics=[clip_t,dino]", "logger=none"])
    assert json.loads((grid2x2 / "report" / "report.json").read_text())["metrics"] == ["clip_t", "dino"]
    assert "report.md" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    bad = [
        [str(tmp_path / "nope")],  # no such directory
        [str(tmp_path / "empty")],  # no job dirs
        [str(grid2x2), "report.metrics=[clip_x]", "logger=none"],  # unknown metric
        [],  # no directory at all
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    hydra_errors = [  # Hydra's own answer, as for zoodip-train: exit 2, naming the override, no traceback
        ([str(grid2x2), "report.metrics=[clip_t"], "[clip_t"),  # unparsable
        ([str(grid2x2), "report.nope=1"], "report.nope"),  # unknown key
        ([str(grid2x2), "logger=nope"], "nope"),  # no such logger
    ]
    for argv, key in hydra_errors:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and key in err and "Traceback" not in err, (argv, err)


def test_cli_subprocess_bad_dir(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "zoodip.analysis.report", str(tmp_path / "missing"), "logger=none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def read_offline_run(run_dir: Path) -> tuple[dict, dict]:
    """The `run` record (job_type, run_group, ...) and the --summary object of an offline run, via `wandb leet`."""
    inspect = [Path(sys.executable).with_name("wandb"), "leet", "inspect", "--json"]
    records = subprocess.run([*inspect, run_dir], capture_output=True, text=True, check=True).stdout
    run = next(r["run"] for r in map(json.loads, records.splitlines()) if r.get("type") == "run")
    summary = subprocess.run([*inspect, "--summary", run_dir], capture_output=True, text=True, check=True).stdout
    return run, json.loads(summary)


def test_wandb_offline_report_run(grid2x2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    for job in ("0", "1"):  # the jobs' own W&B runs name the group and project to join
        path = grid2x2 / job / "metrics.json"
        data = json.loads(path.read_text())
        data["wandb"] = {"project": "zoodip-test", "group": "mu-lr-sweep", "run_id": f"r{job}", "mode": "offline"}
        path.write_text(json.dumps(data))
    out = build_report(grid2x2, metrics=["clip_i"], wandb_mode="offline")
    info = json.loads((out / "report.json").read_text())["wandb"]
    run_dir = Path(info["dir"])
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    run, summary = read_offline_run(run_dir)
    assert run["job_type"] == "report" and run["run_group"] == "mu-lr-sweep" and run["project"] == "zoodip-test"
    assert summary["state"] == "finished" and summary["run_id"] == info["run_id"]
    assert summary["summary"]["best/clip_i"] == pytest.approx(0.80)
    assert summary["summary"]["runs"]["_type"] == "table-file" and summary["summary"]["runs"]["nrows"] == 4
    assert summary["summary"]["heatmap"]["_type"] == "image-file"
    assert summary["config"]["metrics"] == ["clip_i"]


def test_toy_metrics_with_sd_and_paired_tests(tmp_path: Path) -> None:
    """A one-parameter toy-world sweep over 3 seeds: toy metrics chosen, mean ± sd per level, paired tests by hand."""
    from scipy import stats

    acc = {("rge", 0): 0.9, ("rge", 1): 0.8, ("rge", 2): 0.7, ("spsa", 0): 0.5, ("spsa", 1): 0.6, ("spsa", 2): 0.2}
    for n, ((est, seed), a) in enumerate(acc.items()):
        toy = {"subject_accuracy": a, "prompt_accuracy": 0.9, "image_similarity": 0.5, "diversity": 0.2}
        make_job(tmp_path, str(n), {"estimator.name": est, "train.seed": seed}, {"final_loss": 0.1}, toy)
    out = build_report(tmp_path, wandb_mode="disabled")
    info = json.loads((out / "report.json").read_text())
    assert info["metrics"] == ["subject_accuracy", "prompt_accuracy", "image_similarity"]
    md = (out / "report.md").read_text()
    rows = {r[0]: r for r in section(md, "subject_accuracy, prompt_accuracy, image_similarity (mean ± sd")[1:]}
    assert rows["rge"][1] == "**0.800 ± 0.100** ★" and rows["spsa"][1] == "0.433 ± 0.208"
    test = next(t for t in info["paired"] if t["metric"] == "subject_accuracy")
    diff = [0.5 - 0.9, 0.6 - 0.8, 0.2 - 0.7]
    assert (test["reference"], test["level"], test["pairs"]) == ("rge", "spsa", 3)
    assert test["mean_difference"] == pytest.approx(sum(diff) / 3)
    assert test["t_test_p"] == pytest.approx(stats.ttest_rel([0.5, 0.6, 0.2], [0.9, 0.8, 0.7]).pvalue)
    assert test["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diff).pvalue)
    assert "Paired comparisons" in md


def test_factorial_grid_gets_paired_tests_per_factor(tmp_path: Path) -> None:
    """A 2x2 grid (as Table 3's SG x PUTS) over 2 seeds: each factor against its first level, paired within the
    other factor: mean differences by hand."""
    acc = {}
    for sg, a in (("rge", 0.0), ("spsa", 0.1)):
        for puts, b in (("puts", 0.0), ("uniform", -0.3)):
            for seed, c in ((0, 0.5), (1, 0.6)):
                acc[(sg, puts, seed)] = a + b + c + 0.01 * seed * (sg == "spsa")
    for n, ((sg, puts, seed), a) in enumerate(acc.items()):
        toy = {"subject_accuracy": a, "prompt_accuracy": 0.9, "image_similarity": 0.5, "diversity": 0.2}
        make_job(
            tmp_path, str(n), {"estimator.name": sg, "puts.kind": puts, "train.seed": seed}, {"final_loss": 0.1}, toy
        )
    info = json.loads((build_report(tmp_path, wandb_mode="disabled") / "report.json").read_text())
    sg = next(t for t in info["paired"] if t["metric"] == "subject_accuracy" and t["level"] == "spsa")
    puts = next(t for t in info["paired"] if t["metric"] == "subject_accuracy" and t["level"] == "uniform")
    assert (sg["reference"], sg["pairs"]) == ("rge", 4) and sg["mean_difference"] == pytest.approx(0.1 + 0.005)
    assert (puts["reference"], puts["pairs"]) == ("puts", 4) and puts["mean_difference"] == pytest.approx(-0.3)


def test_preempted_and_interrupted_jobs_are_counted_and_labelled(tmp_path: Path) -> None:
    make_job(tmp_path, "0", {"estimator.name": "rge"}, {"final_loss": 0.1})
    make_job(tmp_path, "1", {"estimator.name": "spsa"}, {"status": "preempted", "error": None})
    make_job(tmp_path, "2", {"estimator.name": "one_point"}, {"status": "interrupted", "error": None})
    out = build_report(tmp_path, wandb_mode="disabled")
    md = (out / "report.md").read_text()
    assert "1 completed, 0 failed, 1 preempted, 1 interrupted, 0 missing" in md
    rows = {r[0]: r for r in section(md, "final_loss (mean ± sd")[1:]}
    assert rows["spsa"][1] == "preempted" and rows["one_point"][1] == "interrupted"


def test_paired_summary_by_hand():
    """Differences 1, 2, 3, 4: se = 1.291 / 2 = 0.6455; t_0.975(3) = 3.1824, so the 95% interval is 2.5 +/- 2.054;
    t_0.8(3) = 0.9785, so the detectable effect at 80% power is (3.1824 + 0.9785) * 0.6455 = 2.686."""
    out = paired_summary([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert out["pairs"] == 4 and out["mean_difference"] == 2.5
    assert out["ci_low"] == pytest.approx(2.5 - 2.054, abs=1e-3) and out["ci_high"] == pytest.approx(4.554, abs=1e-3)
    assert out["detectable_effect"] == pytest.approx(2.686, abs=1e-3)
    assert math.isnan(paired_summary([0.9], [0.4])["ci_low"])


def test_paired_verdict_reads_the_interval_not_the_mean():
    """A direction only where the 95% CI excludes 0 (even inside the margin), "equivalent" only where the whole CI
    lies inside +-0.05, otherwise inconclusive whatever the mean's sign."""
    up = paired_summary([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])  # [0.446, 4.554]
    assert paired_verdict(up) == "higher" and paired_verdict(up, higher="holds") == "holds"
    down = paired_summary([0.0] * 4, [0.01, 0.02, 0.03, 0.04])  # [-0.0455, -0.0045]: below 0, inside the margin
    assert paired_verdict(down) == "lower" and paired_verdict(down, lower="hurts") == "hurts"
    inside = {"pairs": 36, "ci_low": -0.027, "ci_high": 0.019}
    assert paired_verdict(inside) == "equivalent within ±0.05"
    assert paired_verdict(inside, equivalent="the same") == "the same" and paired_verdict(inside, margin=0.02) == (
        "inconclusive"
    )
    assert paired_verdict({"pairs": 12, "ci_low": -0.063, "ci_high": 0.001}) == "inconclusive"
    assert paired_verdict(paired_summary([0.9], [0.4])) == "too few pairs"


def test_paired_difference_by_hand():
    """Differences 1, 2, 3, 4: mean 2.5, sd 1.291, t = 2.5 / (1.291 / 2) = 3.873 on 3 degrees of freedom, two-sided
    p = 0.0305; Wilcoxon: all four ranks positive, exact two-sided p = 2 / 2**4 = 0.125. No difference: p = 1; one
    pair: no test."""
    out = paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert out["mean_difference"] == 2.5
    assert out["t_test_p"] == pytest.approx(0.0305, abs=5e-4) and out["wilcoxon_p"] == pytest.approx(0.125)
    assert paired_difference([0.5, 0.7], [0.5, 0.7]) == {"mean_difference": 0.0, "t_test_p": 1.0, "wilcoxon_p": 1.0}
    one = paired_difference([0.9], [0.4])
    assert one["mean_difference"] == pytest.approx(0.5)
    assert math.isnan(one["t_test_p"]) and math.isnan(one["wilcoxon_p"])
