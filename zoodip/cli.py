"""Hydra command-line apps with zoodip's error contract: bad input is one sentence and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from zoodip import CONF_DIR
from zoodip.errors import EXIT_USAGE, ZoodipError, fail

log = logging.getLogger("zoodip")


def hydra_app(config_name: str, task: Callable[[DictConfig], Any], failure: str | None = None) -> Callable[[], None]:
    """Every zoodip command's entry point: `task(cfg)` on conf/<config_name>.yaml, its return value handed to Hydra
    (a sweeper's objective). The error contract of every command:

    * a ZoodipError (bad input) or a Hydra composition error (unknown key or option, bad override) prints one line
      and exits with code 2; inside a multirun the job is logged as rejected and the sweep goes on;
    * Preempted (SIGTERM / SIGUSR2 under a cluster) exits with EXIT_PREEMPTED, Ctrl-C with 130;
    * with `failure` (e.g. "training failed"), any other exception is one line and exit code 1, not a traceback.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from zoodip.runtime.preemption import EXIT_PREEMPTED, Preempted

    started = False

    def body(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg)
        except ZoodipError as err:
            if multirun:
                log.error("job rejected: %s", err)
                return None
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None
        except Preempted:  # a sweep stops too: the cluster (or the user) wants the machine back
            raise SystemExit(EXIT_PREEMPTED) from None
        except KeyboardInterrupt as err:
            print(f"error: interrupted ({err or 'a second signal'})", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        except Exception as err:
            if failure is None:
                raise
            print(f"error: {failure}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    entry = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(body)

    def main() -> None:
        nonlocal started
        started = False  # per call: a test or notebook may run the entry point more than once in one process
        try:
            entry()
        except SystemExit as exit_:
            if exit_.code == 1 and not started:
                raise SystemExit(EXIT_USAGE) from None
            raise

    return main


def hydra_argv(argv: list[str]) -> list[str]:
    """The positional MULTIRUN_DIR becomes the override multirun_dir='DIR' (quoted for Hydra's grammar)."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        quoted = argv[0].replace("\\", "\\\\").replace("'", "\\'")
        return [f"multirun_dir='{quoted}'", *argv[1:]]
    return argv


def multirun_dir_main(argv: list[str] | None, usage: str, doc: str | None, entry: Callable[[], None]) -> None:
    """zoodip-report and zoodip-compare: `entry` (a hydra_app) on `argv`, whose first word may be the positional
    MULTIRUN_DIR. A missing or absent directory is one sentence and exit code 2, before Hydra makes a folder in it."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage + "\n\n" + (doc or ""))
        return
    if not argv:
        fail(f"the multirun directory is required; {usage}")
    given = [a.partition("=")[2].strip("'\"") for a in hydra_argv(argv) if a.startswith("multirun_dir=")]
    if given and not Path(given[0]).expanduser().is_dir():
        fail(f"multirun directory {given[0]} does not exist")
    sys.argv = [sys.argv[0], *hydra_argv(argv)]
    entry()
