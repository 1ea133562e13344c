"""zoodip-study: a study that survives machines. Its record lives in git, not in outputs/.

A study spec (studies/<name>.yaml) names arms (each a list of zoodip-train overrides), subjects and seeds:

    name: toyworld_methods          # optional: the file's name otherwise
    overrides: [logger=none]        # every job's, before its arm's
    arms:
      zoodip: [experiments=toyworld]
      ti: [experiments=toyworld_ti]
    subjects: [red_circle, red_square]
    seeds: [0, 1, 2]

`zoodip-study spec=toyworld_methods` trains every (arm, subject, seed) job that docs/results/<name>/runs.csv does not
record yet, one at a time (zoodip-train in a subprocess, in <work_dir>/<arm>__<subject>__s<seed>), seed by seed and
subject by subject with the arms of a pair together, and after each completed job appends its row to runs.csv and
copies its final token to tokens/<arm>__<subject>__s<seed>.safetensors (and the tokens it kept along the way,
train.keep_tokens_every, to tokens/<arm>__<subject>__s<seed>/).
Both writes are atomic, the token first: a row always has its token. Commit docs/results/<name>/ and the next sitting,
on any machine, runs only what is left. A job interrupted on the same machine continues from its checkpoint
(train.resume=auto); a failed job is not recorded (the next invocation tries it again) and the others carry on.
`study.dry_run=true` lists what is left. Deleting a row reruns exactly that job. `study.shard=i/k` runs every k-th job
(from the i-th) so that k processes, GPUs or machines share a study; they append to runs.csv under a lock.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoodip import ROOT, __version__
from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.io import atomic_write, atomic_write_text, read_json
from zoodip.runtime.preemption import EXIT_PREEMPTED

log = logging.getLogger(__name__)

COLUMNS = [
    "arm",
    "subject",
    "seed",
    "steps",
    "forward_passes",
    "wall_seconds",
    "final_loss",
    "subject_accuracy",
    "prompt_accuracy",
    "image_similarity",
    "diversity",
    "zoodip_version",
    "git_commit",
    "overrides",
    "recorded_at",
]
EVAL_COLUMNS = ("subject_accuracy", "prompt_accuracy", "image_similarity", "diversity")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Job:
    arm: str
    subject: str
    seed: int
    overrides: tuple[str, ...]  # the spec's common overrides, then the arm's, then subject and seed

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.arm, self.subject, str(self.seed))

    @property
    def label(self) -> str:
        return f"{self.arm}__{self.subject}__s{self.seed}"


@dataclass(frozen=True)
class Study:
    name: str
    jobs: list[Job]
    spec: dict[str, Any]


def spec_path(spec: str) -> Path:
    """A spec given as a name under studies/ or as a path (relative to the working directory or the repository)."""
    candidates = [Path(spec).expanduser(), ROOT / spec, ROOT / "studies" / f"{spec}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in (ROOT / "studies").glob("*.yaml"))) or "none"
    raise ZoodipError(f"spec={spec!r} is neither a file nor a study under studies/ (known: {known})")


def _strings(value: Any, what: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ZoodipError(f"{what} must be a {'' if allow_empty else 'non-empty '}list, got {value!r}")
    if not all(isinstance(v, str) and v for v in value):
        raise ZoodipError(f"{what} must hold strings, got {value!r}")
    return list(value)


def load_study(spec: str) -> Study:
    """The spec's jobs, arm by arm, subject by subject, seed by seed. A malformed spec is one sentence."""
    path = spec_path(spec)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:
        raise ZoodipError(f"study spec {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ZoodipError(f"study spec {path} must be a mapping with arms, subjects and seeds")
    unknown = sorted(set(raw) - {"name", "overrides", "arms", "subjects", "seeds", "description"})
    if unknown:
        raise ZoodipError(
            f"study spec {path}: unknown key {unknown[0]!r} (known: name, overrides, arms, subjects, seeds)"
        )
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not _NAME.match(name):
        raise ZoodipError(f"study spec {path}: name must be a plain folder name, got {name!r}")
    common = _strings(raw.get("overrides", []), f"{path.name}: overrides", allow_empty=True)
    arms = raw.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ZoodipError(f"study spec {path}: arms must map arm names to lists of zoodip-train overrides")
    subjects = _strings(raw.get("subjects"), f"{path.name}: subjects")
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ZoodipError(f"study spec {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    for label, values in (("subjects", subjects), ("seeds", seeds), ("arms", list(arms))):
        if len(set(values)) != len(values):
            raise ZoodipError(f"study spec {path}: {label} repeat a value: {values!r}")
    for word in [*arms, *subjects]:
        if not isinstance(word, str) or not _NAME.match(word) or "__" in word:
            raise ZoodipError(f"study spec {path}: {word!r} must be a plain name (letters, digits, _ . -; no '__')")
    arm_overrides = {}
    for arm, overrides in arms.items():
        arm_overrides[arm] = _strings(overrides or [], f"{path.name}: arm {arm}", allow_empty=True)
        for override in [*common, *arm_overrides[arm]]:
            if override.split("=", 1)[0].lstrip("+~") in ("data.subject", "train.seed", "hydra.run.dir"):
                raise ZoodipError(
                    f"study spec {path}: {override!r}: the study sets data.subject, train.seed and the "
                    f"run folder itself (list subjects and seeds instead)"
                )
    # Seed by seed, subject by subject, every arm of a pair together: a study stopped part way has complete
    # pairs on every subject rather than one arm done and the other not started.
    jobs = [
        Job(arm, subject, int(seed), (*common, *arm_overrides[arm], f"data.subject={subject}", f"train.seed={seed}"))
        for seed in seeds
        for subject in subjects
        for arm in arms
    ]
    return Study(name, jobs, raw)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """runs.csv, whole and atomically: after a crash it holds the old rows or the new ones."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def check_recorded(study: Study, rows: list[dict[str, str]], csv_path: Path) -> None:
    """A recorded row made with other overrides than the spec's names its job: change the arm's name, or delete it."""
    wanted = {job.key: " ".join(job.overrides) for job in study.jobs}
    for row in rows:
        key = (row.get("arm", ""), row.get("subject", ""), row.get("seed", ""))
        if key in wanted and row.get("overrides") and row["overrides"] != wanted[key]:
            raise ZoodipError(
                f"{csv_path} records {'/'.join(key)} with other overrides ({row['overrides']!r}; the spec now says "
                f"{wanted[key]!r}): name the changed arm anew, or delete its rows to rerun them"
            )


def parse_shard(shard: Any) -> tuple[int, int]:
    """study.shard="i/k": this process runs the jobs whose index in the spec is i modulo k (0 <= i < k)."""
    match = re.fullmatch(r"(\d+)/(\d+)", str(shard))
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise ZoodipError(f"study.shard must be i/k with 0 <= i < k (e.g. 0/2), got {shard!r}")
    return int(match.group(1)), int(match.group(2))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for a read-modify-write of runs.csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def train_command(job: Job, run_dir: Path) -> list[str]:
    """zoodip-train's arguments for `job` in `run_dir` (quoted for Hydra's grammar where the path needs it)."""
    where = str(run_dir)
    if not re.fullmatch(r"[\w./:+-]+", where):
        where = "'" + where.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [*job.overrides, f"hydra.run.dir={where}"]


def record(job: Job, run_dir: Path, results: Path, commit: str) -> dict[str, Any] | None:
    """The completed job's row, after its token is copied into results/tokens/; None when the job did not complete."""
    try:
        metrics = read_json(run_dir / "metrics.json")
    except (OSError, ValueError):
        return None
    token = run_dir / "learned_embeds.safetensors"
    if not isinstance(metrics, dict) or metrics.get("status") != "completed" or not token.is_file():
        return None
    # the tokens kept along the way (train.keep_tokens_every) first, for curves against forward passes and time
    for kept in sorted((run_dir / "tokens").glob("fwd-*.safetensors")):
        atomic_write(results / "tokens" / job.label / kept.name, lambda tmp, src=kept: shutil.copyfile(src, tmp))
    atomic_write(results / "tokens" / f"{job.label}.safetensors", lambda tmp: shutil.copyfile(token, tmp))
    scores = metrics.get("eval") or {}
    if not scores and OmegaConf.select(OmegaConf.create(metrics.get("config") or {}), "eval.enabled", default=False):
        log.warning("%s: completed without evaluation scores (%s)", job.label, metrics.get("eval_error", "unknown"))
    row = {
        "arm": job.arm,
        "subject": job.subject,
        "seed": job.seed,
        "zoodip_version": __version__,
        "git_commit": commit,
        "overrides": " ".join(job.overrides),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    row.update({k: metrics.get(k) for k in ("steps", "forward_passes", "wall_seconds", "final_loss")})
    row.update({k: scores.get(k) for k in EVAL_COLUMNS})
    return row


def run_study(cfg: DictConfig) -> None:
    study = load_study(str(cfg.spec))
    results = Path(cfg.study.results_dir or ROOT / "docs" / "results" / study.name).expanduser().resolve()
    work = Path(cfg.study.work_dir or Path(cfg.paths.output_dir) / "studies" / study.name).expanduser().resolve()
    csv_path = results / "runs.csv"
    rows = read_rows(csv_path)
    check_recorded(study, rows, csv_path)
    done = {(r.get("arm", ""), r.get("subject", ""), r.get("seed", "")) for r in rows}
    todo = [job for job in study.jobs if job.key not in done]
    shard = cfg.study.get("shard")
    if shard is not None:
        index, count = parse_shard(shard)
        todo = [job for job in todo if study.jobs.index(job) % count == index]
    max_jobs = cfg.study.max_jobs
    if max_jobs is not None and (not isinstance(max_jobs, int) or isinstance(max_jobs, bool) or max_jobs < 0):
        raise ZoodipError(f"study.max_jobs must be an integer >= 0 or null, got {max_jobs!r}")
    recorded = sum(job.key in done for job in study.jobs)
    print(
        f"zoodip-study {study.name}: {recorded} of {len(study.jobs)} jobs recorded in {csv_path}; {len(todo)} to run"
        + (f" in shard {shard}" if shard is not None else ""),
        flush=True,
    )
    if cfg.study.dry_run:
        for job in todo:
            print(f"  {job.label}: zoodip-train {shlex.join(train_command(job, work / job.label))}")
        return
    if not todo:
        return
    atomic_write_text(results / "study.yaml", OmegaConf.to_yaml(OmegaConf.create(study.spec)))
    commit = git_commit()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    failed = []
    for i, job in enumerate(todo[:max_jobs] if max_jobs is not None else todo, start=1):
        run_dir = work / job.label
        print(f"zoodip-study {study.name} [{i}/{len(todo)}] {job.label}: training in {run_dir}", flush=True)
        started = time.perf_counter()
        command = [sys.executable, "-m", "zoodip.runtime.train", *train_command(job, run_dir)]
        code = subprocess.run(command, env=env, cwd=ROOT).returncode
        if code in (EXIT_PREEMPTED, 130):  # the machine is being taken back (or Ctrl-C): stop; the next sitting goes on
            print(
                f"zoodip-study {study.name}: stopped at {job.label} (exit code {code}); run it again to go on",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(code)
        row = record(job, run_dir, results, commit)
        if row is None:
            failed.append(job.label)
            print(
                f"zoodip-study {study.name}: {job.label} did not complete (exit code {code}; see "
                f"{run_dir / 'metrics.json'}): not recorded, the next invocation tries it again",
                file=sys.stderr,
                flush=True,
            )
            continue
        with locked(results / ".runs.csv.lock"):  # another shard may append at the same moment
            write_rows(csv_path, [*read_rows(csv_path), row])
        print(
            f"zoodip-study {study.name}: recorded {job.label} in {csv_path} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    if failed:
        print(f"zoodip-study {study.name}: {len(failed)} jobs failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        raise SystemExit(1)


main = hydra_app("study", run_study)

if __name__ == "__main__":
    main()
