"""zoodip-study: jobs not yet recorded run, each leaves a row and a token; reruns run only what is missing."""

from __future__ import annotations

import csv
import sys

import pytest
import yaml
from safetensors import safe_open

from zoodip.analysis import study

TINY = [
    "model=tiny",
    "data=planted",
    "train.steps=2",
    "data.eval_points=2",
    "sg.tau=4",
    "logger=none",
    "train.progress=false",
    "eval.enabled=false",
    "train.checkpoint_every=0",
]


def write_spec(path, arms, seeds=(0, 1)):
    spec = {"name": "tiny_study", "overrides": TINY, "arms": arms, "subjects": ["planted"], "seeds": list(seeds)}
    path.write_text(yaml.safe_dump(spec))
    return path


def zoodip_study(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["zoodip-study", *args])
    try:
        study.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def rows(results):
    with (results / "runs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_study_runs_what_is_missing_and_nothing_else(tmp_path, monkeypatch, capfd):
    arms = {"rge": ["estimator=rge", "train.keep_tokens_every=3"], "spsa": ["estimator=spsa"]}
    spec = write_spec(tmp_path / "spec.yaml", arms, seeds=(0,))
    results, work = tmp_path / "results", tmp_path / "work"
    args = [f"spec={spec}", f"study.results_dir={results}", f"study.work_dir={work}"]

    assert zoodip_study(monkeypatch, *args, "study.dry_run=true") == 0
    listed = capfd.readouterr().out
    assert "0 of 2 jobs recorded" in listed and "spsa__planted__s0: zoodip-train" in listed and not results.exists()

    assert zoodip_study(monkeypatch, *args) == 0
    first = rows(results)
    assert [(r["arm"], r["subject"], r["seed"]) for r in first] == [
        ("rge", "planted", "0"),
        ("spsa", "planted", "0"),
    ]
    assert list(first[0]) == study.COLUMNS
    for row in first:
        assert row["steps"] == "2" and int(row["forward_passes"]) > 0 and float(row["final_loss"]) > 0
        assert row["subject_accuracy"] == "" and row["zoodip_version"] and "estimator=" in row["overrides"]
        assert (results / "tokens" / f"{row['arm']}__planted__s{row['seed']}.safetensors").stat().st_size > 0
    # the tokens kept along the way travel with the record, each with its step, forward passes and wall time
    kept = sorted((results / "tokens" / "rge__planted__s0").glob("fwd-*.safetensors"))
    assert [p.name for p in kept] == [f"fwd-{n:09d}.safetensors" for n in (0, 3, 6)]
    with safe_open(str(kept[-1]), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "2" and meta["forward_passes"] == "6" and float(meta["wall_seconds"]) > 0
    assert not (results / "tokens" / "spsa__planted__s0").exists()
    assert yaml.safe_load((results / "study.yaml").read_text())["arms"]["rge"] == arms["rge"]
    capfd.readouterr()

    text = (results / "runs.csv").read_text()
    assert zoodip_study(monkeypatch, *args) == 0  # a second invocation runs nothing
    out = capfd.readouterr().out
    assert "2 of 2 jobs recorded" in out and "training in" not in out
    assert (results / "runs.csv").read_text() == text

    # a fresh machine (an empty work dir) with one row deleted: exactly that job runs again
    kept = [r for r in first if (r["arm"], r["seed"]) != ("spsa", "0")]
    study.write_rows(results / "runs.csv", kept)
    fresh = tmp_path / "fresh"
    assert zoodip_study(monkeypatch, f"spec={spec}", f"study.results_dir={results}", f"study.work_dir={fresh}") == 0
    assert sorted(p.name for p in fresh.iterdir()) == ["spsa__planted__s0"]
    again = rows(results)
    assert again[:1] == kept and (again[1]["arm"], again[1]["seed"]) == ("spsa", "0")

    # an arm whose overrides changed after it was recorded is refused, naming the job
    write_spec(spec, {"rge": ["estimator=rge", "sg.tau=8"], "spsa": ["estimator=spsa"]})
    assert zoodip_study(monkeypatch, *args) == 2
    assert "rge/planted/0" in capfd.readouterr().err


def test_a_failed_job_is_not_recorded_and_the_others_are(tmp_path, monkeypatch, capfd):
    arms = {"bad": ["puts.t_low=600", "puts.t_high=550"], "good": []}
    spec = write_spec(tmp_path / "spec.yaml", arms, seeds=[0])
    results = tmp_path / "results"
    args = [f"spec={spec}", f"study.results_dir={results}", f"study.work_dir={tmp_path / 'work'}"]
    assert zoodip_study(monkeypatch, *args) == 1
    assert [r["arm"] for r in rows(results)] == ["good"]
    assert "bad__planted__s0 did not complete" in capfd.readouterr().err
    assert zoodip_study(monkeypatch, *args, "study.dry_run=true") == 0
    assert "1 of 2 jobs recorded" in capfd.readouterr().out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"arms": {"a": []}, "subjects": []}, "subjects"),
        ({"arms": {}, "subjects": ["x"]}, "arms"),
        ({"arms": {"a": ["data.subject=x"]}, "subjects": ["x"]}, "data.subject"),
        ({"arms": {"a__b": []}, "subjects": ["x"]}, "plain name"),
        ({"arms": {"a": []}, "subjects": ["x"], "seeds": ["0"]}, "seeds"),
        ({"arms": {"a": []}, "subjects": ["x"], "typo": 1}, "typo"),
    ],
)
def test_a_bad_spec_is_one_sentence(tmp_path, monkeypatch, capfd, spec, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert zoodip_study(monkeypatch, f"spec={path}", f"study.results_dir={tmp_path / 'r'}") == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and message in err


def test_the_shipped_studies_load():
    sizes = {"toyworld_methods": 2 * 6 * 3, "tableS4_estimators": 3 * 6 * 3, "paper_budget": 3 * 12 * 3}
    sizes.update(sg_paper_budget=2 * 12 * 3, tuned_paper_budget=12 * 3, puts_paper_budget=12 * 2)
    assert sorted(sizes) == sorted(p.stem for p in (study.ROOT / "studies").glob("*.yaml"))
    for name, size in sizes.items():
        loaded = study.load_study(name)
        assert loaded.name == name and len(loaded.jobs) == size


def spec_delta(name: str, arm: str) -> list[str]:
    """What `arm` of studies/<name>.yaml adds to paper_budget's `zoodip` arm, whose runs it is paired with; the
    common overrides, the subjects and the seeds must be the same (the seeds may be the first few)."""
    preset, mine = (yaml.safe_load((study.ROOT / "studies" / f"{n}.yaml").read_text()) for n in ("paper_budget", name))
    assert mine["subjects"] == preset["subjects"] and mine["seeds"] == preset["seeds"][: len(mine["seeds"])]
    assert mine["overrides"] == preset["overrides"]
    extra = [o for o in mine["arms"][arm] if o not in preset["arms"]["zoodip"]]
    assert len(mine["arms"][arm]) == len(preset["arms"]["zoodip"]) + len(extra)
    return extra


def test_the_sg_and_timestep_arms_pair_with_the_central_claims_zoodip():
    """SG and PUTS at the paper's budget: each arm differs from the central claim's ZOODiP in its one factor."""
    assert spec_delta("sg_paper_budget", "sg_off") == ["sg=off"]
    assert spec_delta("sg_paper_budget", "sg_tau43") == ["sg.tau=43"]
    assert spec_delta("puts_paper_budget", "puts_uniform") == ["puts=uniform"]


def test_the_tuned_arm_pairs_with_the_central_claims_preset():
    """Its runs are compared with paper_budget's `zoodip` runs pair by pair: only lr and mu may differ."""
    extra = spec_delta("tuned_paper_budget", "zoodip_tuned")
    assert sorted(o.split("=")[0] for o in extra) == ["estimator.mu", "optimizer.lr"]
    # the values are the recorded search's best trial (docs/results/tuning_budget/trials.csv)
    with (study.ROOT / "docs" / "results" / "tuning_budget" / "trials.csv").open(newline="") as f:
        trials = [r for r in csv.DictReader(f) if r["search"] == "toyworld_zoodip" and r["trial"] != "preset"]
    best = max(trials, key=lambda r: float(r["value"]))  # the first of equal values, as Optuna's best_trial
    values = dict(o.split("=") for o in extra)
    assert float(values["optimizer.lr"]) == float(best["lr"]) and float(values["estimator.mu"]) == float(best["mu"])


def test_shards_split_the_jobs_and_a_bad_shard_is_one_sentence(tmp_path, monkeypatch, capfd):
    spec = write_spec(tmp_path / "spec.yaml", {"rge": [], "spsa": []}, seeds=(0, 1, 2))
    args = [f"spec={spec}", f"study.results_dir={tmp_path / 'r'}", "study.dry_run=true"]
    listed = []
    for shard in ("0/2", "1/2"):
        assert zoodip_study(monkeypatch, *args, f"study.shard={shard}") == 0
        out = capfd.readouterr().out
        assert "0 of 6 jobs recorded" in out and f"3 to run in shard {shard}" in out
        listed.append([line.split(":")[0].strip() for line in out.splitlines() if ": zoodip-train" in line])
    assert listed[0] == ["rge__planted__s0", "rge__planted__s1", "rge__planted__s2"]
    assert listed[1] == ["spsa__planted__s0", "spsa__planted__s1", "spsa__planted__s2"]
    for bad in ("2/2", "x"):
        assert zoodip_study(monkeypatch, *args, f"study.shard={bad}") == 2
        assert "study.shard must be i/k" in capfd.readouterr().err
