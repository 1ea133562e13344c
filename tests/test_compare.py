"""zoodip-compare: equal-forward-pass comparison, its arithmetic by hand and the command end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from zoodip.analysis.compare import forwards_to, job_label, main, summarize


def curve(method: str, subject: str, seed: int, accuracies: list[float], step: int) -> list[dict]:
    return [
        {
            "method": method,
            "subject": subject,
            "seed": seed,
            "forward_passes": i * step,
            "subject_accuracy": a,
            "gap_closed": a / 2,
        }
        for i, a in enumerate(accuracies)
    ]


def test_forwards_to_target_and_speedup_by_hand():
    """Target 0.6: `ref` reaches it at 300, 200 and 200 forwards, `fast` at 100, 100 and never. Speed-ups per
    (subject, seed): 3, 2 and 0 (the reference reached it, `fast` did not), so the median is 2."""
    rows = (
        curve("ref", "a", 0, [0.1, 0.3, 0.5, 0.6], 100)
        + curve("ref", "b", 0, [0.1, 0.5, 0.6, 0.7], 100)
        + curve("ref", "c", 0, [0.2, 0.4, 0.6, 0.6], 100)
        + curve("fast", "a", 0, [0.1, 0.7, 0.7], 100)
        + curve("fast", "b", 0, [0.1, 0.6, 0.8], 100)
        + curve("fast", "c", 0, [0.1, 0.2, 0.3], 100)
    )
    curves = pd.DataFrame(rows)
    assert forwards_to(curves[(curves.method == "ref") & (curves.subject == "a")], 0.6) == 300
    assert math.isinf(forwards_to(curves[(curves.method == "fast") & (curves.subject == "c")], 0.6))
    runs = pd.DataFrame({"method": ["ref", "fast"], "peak_memory_bytes": [100.0, 104.0]})
    table = summarize(curves, runs, "ref", 0.6).set_index("method")
    assert table.loc["ref", "median_forwards_to_target"] == 200  # 300, 200, 200
    assert table.loc["fast", "reached_target"] == 2
    assert table.loc["fast", "median_speedup"] == pytest.approx(2.0)
    assert table.loc["fast", "final_subject_accuracy"] == pytest.approx((0.7 + 0.8 + 0.3) / 3)
    assert table.loc["fast", "accuracy_minus_reference"] == pytest.approx(((0.7 - 0.6) + (0.8 - 0.7) + (0.3 - 0.6)) / 3)
    assert table.loc["fast", "memory_vs_reference"] == pytest.approx(1.04) and table.loc["fast", "memory_ok"]
    # the budget every run reached is 200 (fast's); there ref has 0.5, 0.6, 0.6 and fast 0.7, 0.8, 0.3
    assert (table["equal_budget"] == 200).all()
    assert table.loc["ref", "equal_budget_accuracy"] == pytest.approx(1.7 / 3)
    assert table.loc["fast", "equal_budget_minus_reference"] == pytest.approx((0.2 + 0.2 - 0.3) / 3)
    assert math.isnan(table.loc["ref", "median_speedup"]) and math.isnan(table.loc["fast", "speedup_wilcoxon_p"])


def test_method_labels_leave_subject_and_seed_out():
    swept = ["data.subject", "estimator", "train.seed"]
    assert job_label({"data.subject": "x", "estimator": "prgf", "train.seed": 1}, swept) == "prgf"
    both = ["estimator", "sg"]
    assert job_label({"estimator": "rge", "sg": "off"}, both) == "estimator=rge,sg=off"


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory) -> Path:
    """A real two-job sweep on the shipped toy world: rge and prgf, 30 forward passes, a token every 15."""
    out = tmp_path_factory.mktemp("compare") / "sweep"
    cmd = [
        Path(sys.executable).with_name("zoodip-train"),
        "-m",
        "experiments=toyworld",
        "estimator=rge,prgf",
        "data.subject=red_circle",
        "train.forward_budget=30",
        "train.keep_tokens_every=15",
        "eval.enabled=false",
        "logger=none",
        "train.progress=false",
        "train.checkpoint_every=0",
        f"hydra.sweep.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_compare_end_to_end(two_methods: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import zoodip.analysis.compare as compare_mod

    calls = []

    class Counting(compare_mod.Validator):
        def __call__(self, theta):
            calls.append(theta)
            return super().__call__(theta)

    monkeypatch.setattr(compare_mod, "Validator", Counting)
    main([str(two_methods), "compare.images_per_prompt=1", "compare.pool=2", "compare.reuse=false"])
    assert len(calls) == 5  # 2 runs x 3 tokens, the shared initializer token scored once
    out = two_methods / "compare"
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(curves["method"].unique()) == ["prgf", "rge"]
    assert sorted(curves["forward_passes"].unique()) == [0, 15, 30]
    start = curves[curves.forward_passes == 0]
    assert (start["gap_closed"] == 0).all() and start["pool_loss"].nunique() == 1  # one initializer, one pool
    assert curves["subject_accuracy"].between(0, 1).all() and (curves["true_caption_loss"] > 0).all()
    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["rge", "memory_vs_reference"] == 1.0 and summary.loc["prgf", "runs"] == 1
    assert (out / "curves.png").stat().st_size > 0 and (out / "finals.png").stat().st_size > 0
    assert "| prgf |" in (out / "summary.md").read_text()
    assert "median speed-up" in capsys.readouterr().out


def test_compare_reuses_measured_curves(two_methods: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second zoodip-compare with the same settings measures nothing again (no model is loaded); other settings
    measure anew."""
    import zoodip.analysis.compare as compare_mod

    main([str(two_methods), "compare.images_per_prompt=1", "compare.pool=2"])
    before = pd.read_csv(two_methods / "compare" / "curves.csv")

    loads = []
    real = compare_mod.SubjectProbe
    monkeypatch.setattr(compare_mod, "SubjectProbe", lambda *a, **k: loads.append(a) or real(*a, **k))
    main([str(two_methods), "compare.images_per_prompt=1", "compare.pool=2"])
    pd.testing.assert_frame_equal(pd.read_csv(two_methods / "compare" / "curves.csv"), before)
    assert loads == []
    main([str(two_methods), "compare.images_per_prompt=1", "compare.pool=3"])
    assert len(loads) == 1 and (pd.read_csv(two_methods / "compare" / "curves.csv")["pool"] == 3).all()


@pytest.mark.slow  # the end-to-end comparison above runs the same scoring on every kept token
def test_compare_final_tokens_only(two_methods: Path, tmp_path: Path) -> None:
    """compare.tokens=final scores each run's first and last token only, here on more images, into its own folder;
    the finals' pool losses are those of the full curve (same pool)."""
    main([str(two_methods), "compare.images_per_prompt=1", "compare.pool=2"])
    full = pd.read_csv(two_methods / "compare" / "curves.csv")
    out = tmp_path / "finals"
    main(
        [
            str(two_methods),
            "compare.images_per_prompt=3",
            "compare.pool=2",
            "compare.tokens=final",
            f"compare.output={out}",
        ]
    )
    finals = pd.read_csv(out / "curves.csv")
    assert sorted(finals["forward_passes"].unique()) == [0, 30] and (finals["images_per_prompt"] == 3).all()
    key = ["job", "forward_passes"]
    merged = finals.merge(full, on=key, suffixes=("", "_full"))
    assert len(merged) == 4 and merged["pool_loss"].tolist() == pytest.approx(merged["pool_loss_full"].tolist())
    summary = pd.read_csv(out / "summary.csv")
    assert summary["median_speedup"].isna().all() and summary["equal_budget_accuracy"].isna().all()
    assert summary["final_subject_accuracy"].notna().all()


def test_compare_errors_are_one_sentence(two_methods: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare"
    (bare / "0" / ".hydra").mkdir(parents=True)
    sd = tmp_path / "sd"
    (sd / "0" / ".hydra").mkdir(parents=True)
    (sd / "0" / "tokens").mkdir()
    (sd / "0" / ".hydra" / "config.yaml").write_text("eval:\n  kind: dreambooth\n")
    cases = [
        ([str(tmp_path / "nope")], "does not exist"),
        ([str(bare)], "kept tokens"),
        ([str(sd)], "not a toy-world run"),
        ([str(two_methods), "compare.reference=spsa"], "none of the methods"),
        ([], "required"),
        ([str(two_methods), "compare.tokens=last"], "compare.tokens must be all or final"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and err.count("\n") == 1, (argv, err)
