"""Hydra command-line apps with zoodip's error contract: bad input is one sentence and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from zoodip import CONF_DIR
from zoodip.errors import EXIT_USAGE, ZoodipError


def hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    """A console entry point running `task(cfg)` on conf/<config_name>.yaml. A ZoodipError from the task, or a
    Hydra composition error (unknown key or option, bad override), prints one line and exits with code 2."""
    started = False

    def body(cfg: DictConfig) -> None:
        nonlocal started
        started = True
        try:
            task(cfg)
        except ZoodipError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE) from None

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
