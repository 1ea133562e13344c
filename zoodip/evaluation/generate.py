"""zoodip-generate: images of a learned token, the way any diffusers user gets them (load_textual_inversion).

    zoodip-generate run_dir=<run> prompt="a photo of <dog6> on the beach" num_images=4 scheduler=dpm
    zoodip-generate embedding=learned_embeds_sdxl.safetensors token="<dog6>" model=sdxl quantization=none

With run_dir, the model and quantization the run trained on (conf/generate.yaml: model=, model.path=, quantization=
override them); with embedding, a token file of either layout (zoodip/models/embeddings.py) on `model`. Writes,
into a new folder (built hidden and renamed into place): NN_sSEED.png per image, grid.png and generate.json
(every setting).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from zoodip.analysis.pictures import enlarged, image_grid
from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import build_pipeline, generate, read_embeddings, run_config
from zoodip.evaluation.settings import GenerationSettings
from zoodip.io import atomic_write, check_new_folder, current_umask, new_folder, write_json
from zoodip.models.embeddings import load_embedding
from zoodip.models.loading import ModelSettings, resolve_device
from zoodip.schema import model_settings

#: Short names for diffusers' schedulers (`scheduler=`); a diffusers class name works too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


@dataclass
class Job:
    """What to generate: the (quantized) model, the token's rows and name, the prompt, the scheduler."""

    model: ModelSettings
    rows: list[torch.Tensor]
    token: str
    prompt: str
    generation: GenerationSettings  # the seed, steps, guidance, batch size and scheduler
    num_images: int
    resolution: int
    device: str
    source: dict[str, str | None]  # run_dir or embedding, as generate.json records them


MODEL_KEYS = tuple(f.name for f in fields(ModelSettings) if f.name not in ("weights", "others", "dequantized_copy"))


def _user_model(cfg: DictConfig) -> dict[str, Any]:
    """The model keys given on the command line (a model= group or model.*=...), resolved, without the nulls."""
    given = OmegaConf.to_container(cfg.model, resolve=True)
    return {k: v for k, v in given.items() if v is not None and k in MODEL_KEYS}


def _from_run(cfg: DictConfig) -> tuple[ModelSettings, list[torch.Tensor], str]:
    run_dir = Path(str(cfg.run_dir)).expanduser()
    run = run_config(run_dir)
    token = str(run.data.placeholder_token)
    model = model_settings(run)
    rows = read_embeddings(run_dir, token, 2 if model.is_sdxl else 1)
    given = _user_model(cfg)
    if "path" in given and "init" not in given:
        given["init"] = "pretrained"  # another weights folder of the same architecture
    model = replace(model, **given)
    if cfg.quantization.weights is not None:
        q = cfg.quantization
        model = replace(model, weights=str(q.weights), others=str(q.others or q.weights))
    return model, rows, cfg.token or token


def _from_file(cfg: DictConfig) -> tuple[ModelSettings, list[torch.Tensor], str]:
    if cfg.model.get("arch") is None:
        raise ZoodipError("embedding= needs the model it was learned for: add model=sd15 (or sd21, sdxl, toyworld...)")
    name, rows = load_embedding(str(cfg.embedding), bool(cfg.allow_pickle))
    token = cfg.token or name
    if not token:
        raise ZoodipError(f"{cfg.embedding} does not name its token (A1111 layout): add token='<name>'")
    weights = cfg.quantization.weights or "none"
    quantization = {"weights": weights, "others": cfg.quantization.others or weights}
    model = OmegaConf.to_container(cfg.model, resolve=True)  # model.path may be ${paths...}: resolved here
    return model_settings(OmegaConf.create({"model": model, "quantization": quantization})), rows, token


def prepare(cfg: DictConfig) -> Job:
    """Check the inputs (one sentence each) and gather what the pipeline needs; nothing heavy is loaded."""
    if bool(cfg.run_dir) == bool(cfg.embedding):
        raise ZoodipError("give exactly one of run_dir=<zoodip-train run> or embedding=<token file> (with model=...)")
    for key in ("num_images", "num_inference_steps", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ZoodipError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    if not isinstance(cfg.guidance_scale, int | float):
        raise ZoodipError(f"guidance_scale must be a number, got {cfg.guidance_scale!r}")
    model, rows, token = _from_run(cfg) if cfg.run_dir else _from_file(cfg)
    encoders = 2 if model.is_sdxl else 1
    if len(rows) != encoders:
        raise ZoodipError(
            f"the token has rows for {len(rows)} text encoder(s) but model.arch={model.arch} has {encoders}; "
            "SDXL tokens need both (learned_embeds_2.safetensors beside the file, or one clip_l/clip_g file)"
        )
    prompt = cfg.prompt or f"a photo of {token}"
    if token not in prompt:
        raise ZoodipError(f"prompt={prompt!r} does not contain the token {token}; e.g. prompt='a photo of {token}'")
    g = GenerationSettings(
        int(cfg.seed),
        int(cfg.num_inference_steps),
        float(cfg.guidance_scale),
        int(cfg.batch_size),
        scheduler_class(cfg.scheduler),
    )
    resolution = int(cfg.resolution or model.resolution)
    source = {"run_dir": cfg.run_dir and str(cfg.run_dir), "embedding": cfg.embedding and str(cfg.embedding)}
    return Job(model, rows, token, prompt, g, int(cfg.num_images), resolution, str(cfg.device), source)


def scheduler_class(name: str | None) -> str | None:
    """A diffusers scheduler class name for `scheduler=` (a short name or a class name); None = the model's own."""
    if name is None:
        return None
    import diffusers

    cls_name = SCHEDULERS.get(str(name), str(name))
    if not (isinstance(getattr(diffusers, cls_name, None), type) and cls_name.endswith("Scheduler")):
        raise ZoodipError(f"scheduler={name!r} is not one of {', '.join(SCHEDULERS)} or a diffusers scheduler class")
    return cls_name


def load_pipeline(job: Job, device: torch.device) -> DiffusionPipeline:
    """The (quantized) model with the token added to every text encoder by diffusers' load_textual_inversion."""
    return build_pipeline(job.model, device, job.rows, job.token, job.generation.scheduler)


def write_outputs(folder: Path, images: list[Image.Image], names: list[str], settings: dict[str, Any]) -> None:
    """The images, grid.png and generate.json, into `folder` (complete or absent: zoodip.io.new_folder)."""
    with new_folder(folder) as staging:
        os.chmod(staging, 0o777 & ~current_umask())  # an ordinary folder's mode, not mkdtemp's 0o700
        for name, image in zip(names, images, strict=True):
            atomic_write(staging / name, lambda tmp, im=image: im.save(tmp, format="PNG"))
        grid = image_grid([enlarged(im) for im in images], cols=min(4, len(images)))
        atomic_write(staging / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
        write_json(staging / "generate.json", settings)


def run(cfg: DictConfig, folder: Path) -> dict[str, Any]:
    """Generate `num_images` images of `prompt` (seeds seed + j) into `folder`; returns generate.json's content."""
    job = prepare(cfg)
    check_new_folder(folder)  # before the model is loaded
    device = resolve_device(job.device, "device")
    started = time.perf_counter()
    pipe = load_pipeline(job, device)
    g = job.generation
    seeds = [g.seed + j for j in range(job.num_images)]
    images = generate(pipe, [job.prompt] * len(seeds), seeds, g, job.resolution)
    names = [f"{j:02d}_s{s:04d}.png" for j, s in enumerate(seeds)]
    m = job.model
    settings = {
        "prompt": job.prompt,
        "token": job.token,
        "seeds": seeds,
        "images": names,
        "grid": "grid.png",
        "num_inference_steps": g.num_inference_steps,
        "guidance_scale": g.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "resolution": job.resolution,
        "device": str(device),
        **job.source,
        "model": m.path if m.init == "pretrained" else f"random:{m.arch}:seed{m.seed}",
        "model_arch": m.arch,
        "quantization": m.weights,
        "seconds": time.perf_counter() - started,
    }
    write_outputs(folder, images, names, settings)
    return settings


def task(cfg: DictConfig) -> None:
    folder = Path(HydraConfig.get().runtime.output_dir)
    settings = run(cfg, folder)
    print(f"zoodip-generate: {len(settings['images'])} images of {settings['prompt']!r} -> {folder}", file=sys.stderr)


main = hydra_app("generate", task)

if __name__ == "__main__":
    main()
