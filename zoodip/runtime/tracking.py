"""Experiment tracking: Weights & Biases (offline by default) or nothing. One tracker run per Hydra job."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    """A W&B run when `logger.name=wandb` (and mode is not disabled); otherwise every call is a no-op."""

    def __init__(self, cfg: DictConfig, run_dir: Path, job_type: str = "train", name: str | None = None) -> None:
        self.run = None
        logger = cfg.logger
        if logger.name != "wandb" or logger.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            mode=logger.mode,
            group=logger.group,
            job_type=job_type,
            name=logger.run_name or name or run_dir.name,
            tags=list(logger.tags or []),
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker whose every call is a no-op (the other ranks of a distributed run)."""
        tracker = cls.__new__(cls)
        tracker.run = None
        return tracker

    @property
    def info(self) -> dict[str, Any] | None:
        if self.run is None:
            return None
        return {
            "project": self.run.project,
            "group": self.run.group,
            "run_id": self.run.id,
            "mode": self.run.settings.mode,
            "dir": self.run.dir,
        }

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float | str | bool) or value is None:
                    self.run.summary[key] = value

    def log_images(
        self, key: str, images: list[Any], captions: list[str] | None = None, step: int | None = None
    ) -> None:
        """PIL images (shown as one W&B media panel), with optional captions."""
        if self.run is not None and images:
            import wandb

            captions = captions or [None] * len(images)
            media = [wandb.Image(im, caption=c) for im, c in zip(images, captions, strict=True)]
            self.run.log({key: media}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A wandb.Table; PIL images in the rows become wandb.Image cells."""
        if self.run is not None:
            import wandb
            from PIL import Image

            data = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row] for row in rows]
            self.run.log({key: wandb.Table(columns=columns, data=data)}, step=step)

    def artifact(self, path: Path, name: str, kind: str) -> None:
        if self.run is not None and path.exists():
            import wandb

            art = wandb.Artifact(name, type=kind)
            art.add_file(str(path))
            self.run.log_artifact(art)

    def warn(self, title: str, text: str, step: int) -> None:
        """A warning: logged, counted as `warnings/<title>` in the run's metrics, and a W&B alert when online."""
        log.warning("%s", text)
        if self.run is not None:
            self.run.log({f"warnings/{title}": 1}, step=step)
            if self.run.settings.mode == "online":
                self.run.alert(title=title, text=text, level="WARN")

    def preempted(self) -> None:
        """Mark the W&B run as preempted (it then shows as such, not as crashed) before finish()."""
        if self.run is not None:
            self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
