"""Every zoodip command line in README.md and docs/*.md composes against the real configs (as `--cfg job` would), so
the documentation cannot drift from the code. Multiruns compose once per swept value. Every relative link in the
Markdown files resolves to a file of the repository (and a #fragment to one of its headings)."""

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

#: The files whose zoodip commands are checked: README.md, docs/REPRODUCE.md and every page of docs/ with a command.
DOCS = [
    ROOT / "README.md",
    *(
        ROOT / "docs" / name
        for name in (
            "REPRODUCE.md",
            "configuration.md",
            "toyworld.md",
            "sweeps.md",
            "evaluation.md",
            "benchmarking.md",
            "gpu.md",
            "distributed.md",
        )
    ),
]
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
    "zoodip-gpu-check": "gpu_check",
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
    names = {path.name: len(doc_commands(path)) for path in DOCS}
    assert names["README.md"] >= 5 and names["REPRODUCE.md"] >= 5 and all(names.values()), names


def test_every_page_with_commands_is_checked():
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if doc_commands(p)]
    assert set(pages) <= set(DOCS), sorted(p.name for p in set(pages) - set(DOCS))


@pytest.mark.parametrize(("doc", "line"), CASES, ids=[f"{d}:{line[:60]}" for d, line in CASES])
def test_doc_command_composes(doc, line):
    check(line)


def test_a_bad_command_is_caught():
    with pytest.raises(Exception, match="sg.tauu|tauu"):
        check("zoodip-train sweeps=table3_sg_puts sg.tauu=3")
    with pytest.raises(Exception, match="eval.nope"):
        check("zoodip-eval run_dir=<run> eval.nope=1")


# ---------------------------------------------------------------------------------------------------------------
# links

#: The Markdown files whose relative links must resolve.
LINKED = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens, -N for
    repeats."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\]\(([^()\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(doc: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `doc` that leave `root`, name a missing file, or a heading its Markdown file lacks."""
    broken = []
    for link in relative_links(doc):
        file, _, fragment = link.partition("#")
        target = (doc.parent / file).resolve() if file else doc
        missing = not target.is_relative_to(root.resolve()) or not target.exists()
        if missing or (fragment and target.suffix == ".md" and fragment not in anchors(target)):
            broken.append(link)
    return broken


@pytest.mark.parametrize("doc", LINKED, ids=[str(p.relative_to(ROOT)) for p in LINKED])
def test_relative_links_resolve(doc):
    assert not broken_links(doc)


def test_a_broken_link_is_caught(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "b.md").write_text("# B page\n\n## `make gpu-check`: the check\n\n## Twice\n\n## Twice\n")
    (tmp_path / "outside.md").write_text("")
    good = ["docs/b.md", "docs/b.md#b-page", "docs/b.md#make-gpu-check-the-check", "docs/b.md#twice-1", "#a"]
    bad = ["docs/c.md", "docs/b.md#nope", "../outside.md"]
    links = " ".join(f"[x]({link})" for link in [*good, "https://example.org/y", *bad])
    (root / "a.md").write_text(f"# A\n\n{links}\n\n```\n[x](in/code.md)\n```\n")
    assert broken_links(root / "a.md", root) == bad
