"""Every zoodip command line in README.md and docs/REPRODUCE.md composes against the real configs (as `--cfg job`
would), so the documentation cannot drift from the code. Multiruns compose once per swept value."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from zoodip import CONF_DIR, ROOT
from zoodip.cli import hydra_argv as report_argv
from zoodip.evaluation.evaluate import hydra_argv as eval_argv

DOCS = [ROOT / "README.md", ROOT / "docs" / "REPRODUCE.md"]
#: Hydra apps and their primary config.
HYDRA_APPS = {
    "zoodip-train": "train",
    "zoodip-demo": "train",
    "zoodip-bench": "bench",
    "zoodip-report": "report",
    "zoodip-eval": "train",
    "zoodip-compare": "compare",
    "zoodip-generate": "generate",
    "zoodip-export": "export",
    "zoodip-dashboard": "dashboard",
    "zoodip-study": "study",
}
COMMANDS = set(HYDRA_APPS)


def doc_commands(path: Path) -> list[str]:
    """The zoodip command lines inside the file's fenced code blocks (comments stripped by shlex later)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.split(" ", 1)[0] in COMMANDS]


CASES = [(path.name, line) for path in DOCS for line in doc_commands(path)]


def placeholders_filled(arg: str) -> str:
    """`run_dir=<run>`, `outputs/multiruns/<date>/<time>`: the doc's placeholders become a plain word (quoted
    values such as prompt="a photo of <dog6>" are real Hydra strings and stay)."""
    key, sep, value = arg.partition("=")
    if value.startswith(("'", '"')):
        return arg
    return re.sub(r"<[^<>]+>", "x", arg)


def single_runs(overrides: list[str]) -> list[list[str]]:
    """A multirun's override lists: the first value of every swept key, then each other value of each in turn."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = {o.get_key_element(): sweep_values(o) for o in parsed if o.is_sweep_override()}
    first = [values[0] for values in swept.values()]
    runs = [fixed + first]
    for i, values in enumerate(swept.values()):
        runs += [fixed + first[:i] + [v] + first[i + 1 :] for v in values[1:]]
    return runs


def sweep_values(override) -> list[str]:
    """A swept key's values: a grid's each, an Optuna interval's two ends (hparams_search/)."""
    key = override.get_key_element()
    if override.is_interval_sweep():
        return [f"{key}={override.value().start}", f"{key}={override.value().end}"]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def compose_hydra(config: str, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config, overrides=single_runs(overrides)[0], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.get("params") or {})
        given = {o.split("=", 1)[0] for o in overrides}
        extra = [f"{k}={v}" for k, v in params.items() if k not in given]  # the sweep file's grid
        for run in single_runs([*overrides, *extra]):
            compose(config_name=config, overrides=run)


def check(line: str) -> None:
    command, *args = shlex.split(line, comments=True)
    args = [placeholders_filled(a) for a in args if a != "-m"]
    if command in ("zoodip-report", "zoodip-compare"):
        args = report_argv(args)  # their positional MULTIRUN_DIR
    if command == "zoodip-eval":
        args = [a for a in eval_argv(args) if not a.startswith("hydra")]  # train's config plus +run_dir
    if command == "zoodip-dashboard" and args and "=" not in args[0]:
        args[0] = f"group={args[0]}"  # its positional sweep group
    compose_hydra(HYDRA_APPS[command], args)


def test_the_docs_have_commands():
    names = {path: len(doc_commands(path)) for path in DOCS}
    assert all(n >= 5 for n in names.values()), names


@pytest.mark.parametrize(("doc", "line"), CASES, ids=[f"{d}:{line[:60]}" for d, line in CASES])
def test_doc_command_composes(doc, line):
    check(line)


def test_a_bad_command_is_caught():
    with pytest.raises(Exception, match="sg.tauu|tauu"):
        check("zoodip-train sweeps=table3_sg_puts sg.tauu=3")
    with pytest.raises(Exception, match="eval.nope"):
        check("zoodip-eval run_dir=<run> eval.nope=1")
