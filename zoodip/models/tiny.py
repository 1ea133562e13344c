"""zoodip-make-tiny DIR: write the built-in tiny model as a diffusers folder (loadable with from_pretrained)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from zoodip.errors import cli_errors
from zoodip.evaluation.evaluate import assemble_pipeline
from zoodip.io import new_folder
from zoodip.models.loading import load_components


def make_tiny(directory: str | Path, sdxl: bool = False, seed: int = 0, eval_models: bool = False) -> Path:
    """Build the tiny SD (or SDXL) pipeline with seeded random weights and save it to `directory`.

    The folder is written beside the target and renamed into place, so it is complete or absent.
    With `eval_models`, also write tiny random CLIP and DINOv2 scorers as `directory/clip`, `directory/dinov2`.
    """
    parts = load_components(
        "tiny_sdxl" if sdxl else "tiny", "random", None, torch.float32, torch.device("cpu"), "none", seed
    )
    scheduler = DDIMScheduler.from_config(parts.scheduler.config)
    pipe = assemble_pipeline(parts, parts.vae, scheduler)
    with new_folder(directory) as staging:
        pipe.save_pretrained(staging)
        if eval_models:
            from zoodip.evaluation.scoring import write_tiny_eval_models

            write_tiny_eval_models(staging)
    return Path(directory).expanduser()


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zoodip-make-tiny", description=__doc__)
    parser.add_argument("directory", help="folder to create (must not exist or be empty)")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL-shaped variant with two text encoders")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--eval-models", action="store_true", help="also write tiny CLIP and DINOv2 scorers")
    args = parser.parse_args(argv)
    path = make_tiny(args.directory, sdxl=args.sdxl, seed=args.seed, eval_models=args.eval_models)
    print(f"wrote the tiny {'SDXL' if args.sdxl else 'SD'} pipeline to {path}")


if __name__ == "__main__":
    main()
