"""zoodip-eval: the paper's evaluation of a personalized token (S1.1-S1.2, S3.3), stored next to the run and in W&B.

    zoodip-eval run_dir=outputs/.../<run> [eval.images_per_prompt=5] [eval.clip.path=DIR] [eval=quick] [logger=none]

A Hydra app on zoodip-train's own config (conf/train.yaml, with run_dir added), so every override is checked against
the same groups as training; the overrides given are then applied to the run's saved config, which is evaluated.

Protocol. The 25 DreamBooth prompts of the subject (Table S2 living, Table S3 objects; S1.1: the class noun is left
out unless eval.use_class_token), `eval.images_per_prompt` images each with seeds eval.seed + j (one CPU
torch.Generator per image, so a rerun or another batch size draws the same starting noise). CLIP-I and DINO (S1.2):
mean cosine of every generated image against every reference image (the run's data.path, embedded once). CLIP-T
(S1.2): cosine of each image with its prompt's text, the placeholder replaced by the class noun. DINO_inter (S3.3):
mean pairwise DINOv2 cosine of `eval.diversity_images` images of the first prompt (seeds eval.seed + j; the first
images_per_prompt of them are the scored images of that prompt, so only the rest are extra).

Outputs, in <run>/eval/ (built in a hidden folder beside it and renamed into place: complete or absent):
  images/pXX_sYYYY.png   prompt index XX, seed YYYY (the diversity images are p00_s... too)
  scores.csv             one row per scored image: prompt, seed, clip_t, clip_i, dino
  metrics.json           clip_t, clip_i, dino, dino_inter means; per_prompt means; counts; backbones; speed

Reference-free runs (data=planted) have no reference images: clip_i and dino are null, CLIP-T and DINO_inter are
computed as usual.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import pandas as pd
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

from zoodip import CONF_DIR, ROOT
from zoodip.analysis.pictures import first_of_each_prompt, image_grid, reference_grid
from zoodip.cli import hydra_app
from zoodip.data.dataset import read_reference_images, subject_table
from zoodip.data.prompts import eval_prompts, text_prompts
from zoodip.errors import ZoodipError, fail
from zoodip.evaluation.scoring import (
    OPEN_CLIP_MODEL,
    OPEN_CLIP_PRETRAINED,
    ClipScorer,
    DinoScorer,
    clip_i_per_image,
    clip_t,
    dino_inter,
    dino_per_image,
)
from zoodip.evaluation.settings import ClipSettings, EvalSettings, GenerationSettings
from zoodip.io import atomic_write, read_json, write_json
from zoodip.method.objective import TextConditioner
from zoodip.models.loading import Components, ModelSettings, arch_dir, quantize_vae, random_vae, resolve_device
from zoodip.runtime.tracking import Tracker
from zoodip.schema import eval_settings
from zoodip.toyworld import world as toyworld

log = logging.getLogger("zoodip.eval")
USAGE = "usage: zoodip-eval run_dir=<run dir> [eval.images_per_prompt=N] [eval=quick] [logger=none] [key=value ...]"
_MISSING = object()

# ---------------------------------------------------------------------------------------------------------------
# configuration: the run's own config, eval defaults for runs that predate them, overrides


def _group(group: str, option: str) -> DictConfig:
    """One option of a config group (conf/<group>/ or <root>/<group>/, e.g. eval/quick.yaml), its defaults merged."""
    path = next(
        (p for p in (CONF_DIR / group / f"{option}.yaml", ROOT / group / f"{option}.yaml") if p.is_file()), None
    )
    if path is None:
        raise ZoodipError(f"{group}={option!r} is not an option of config group {group!r}")
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for name in node.pop("defaults", []):
        if name != "_self_":
            merged = OmegaConf.merge(merged, _group(group, name))
    return OmegaConf.merge(merged, node)


def prepare_config(cfg: DictConfig, overrides: dict[str, Any] | None = None) -> DictConfig:
    """A copy of a run's config with the eval/dreambooth.yaml defaults under any eval.* keys it lacks, then the
    overrides: `{"eval.images_per_prompt": 1}` sets a key that must exist; `{"logger": "none"}` swaps a group."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.eval = OmegaConf.merge(_group("eval", "dreambooth"), cfg.get("eval") or {})
    for key, value in (overrides or {}).items():
        if "." not in key and isinstance(cfg.get(key), DictConfig) and isinstance(value, DictConfig):
            cfg[key] = value  # a group chosen on zoodip-eval's command line, composed by Hydra
        elif "." not in key and isinstance(cfg.get(key), DictConfig) and isinstance(value, str):
            cfg[key] = _group(key, value)
        elif OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ZoodipError(f"unknown override {key}={value!r}: the run's config has no key {key!r}")
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> DictConfig:
    """The finished run's `.hydra/config.yaml`, prepared by `prepare_config`."""
    path = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ZoodipError(f"run_dir={str(run_dir)!r} is not a folder; point it at a finished zoodip-train run")
    if not path.is_file():
        raise ZoodipError(f"{run_dir} has no .hydra/config.yaml; point run_dir at a zoodip-train run folder")
    return prepare_config(OmegaConf.load(path), overrides)


# ---------------------------------------------------------------------------------------------------------------
# inputs: embeddings, prompts, reference images


def read_embeddings(run_dir: Path, placeholder: str, num_encoders: int) -> list[torch.Tensor]:
    """The learned token per text encoder, (k, d) each: learned_embeds.safetensors (and _2 for SDXL)."""
    out = []
    for i in range(num_encoders):
        path = run_dir / ("learned_embeds.safetensors" if i == 0 else f"learned_embeds_{i + 1}.safetensors")
        if not path.is_file():
            raise ZoodipError(f"{path} is missing: the run did not save its token (did training finish?)")
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise ZoodipError(
                f"{path} is not a readable safetensors file ({type(err).__name__}); retrain the run"
            ) from None
        if len(tensors) != 1 or next(iter(tensors.values())).ndim not in (1, 2):
            raise ZoodipError(f"{path} must hold one (k, d) tensor under the placeholder, got keys {list(tensors)}")
        key, value = next(iter(tensors.items()))
        if key != placeholder:
            raise ZoodipError(f"{path} holds token {key!r}, but the run's data.placeholder_token is {placeholder!r}")
        out.append(value.reshape(-1, value.shape[-1]).float())
    return out


@dataclass
class PromptSet:
    """The 25 generation prompts (Tables S2/S3) and, row-aligned, the CLIP-T texts with the class noun."""

    prompts: list[str]
    texts: list[str]
    class_noun: str
    living: bool


def prompt_set(ev: EvalSettings) -> PromptSet:
    """Living or object table from the subject table (Table S1), or eval.living; the class noun from eval.class_noun,
    else the table, else the run's initializer word (data.initializer_token, else model.initializer_token). Planted
    runs default to the object table."""
    data = ev.data
    row = subject_table().get(data.subject)
    noun = ev.class_noun or (row["class"] if row else None) or data.initializer
    living = ev.living if ev.living is not None else (row["living"].lower() == "true" if row else None)
    if living is None and data.kind == "planted":
        living = False
    if not noun or living is None:
        raise ZoodipError(
            f"data.subject={data.subject!r} is not a DreamBooth subject: set eval.living=true|false "
            "(and eval.class_noun, e.g. eval.class_noun=toy) to pick its prompts"
        )
    prompts = eval_prompts(data.placeholder, noun, living, ev.use_class_token)
    return PromptSet(prompts, text_prompts(noun, living), noun, living)


def reference_images(path: str | None) -> list[Image.Image]:
    """Every readable image of the subject folder, as RGB PIL images at full size (the scorers resize them), read
    by training's reader (zoodip.data.dataset.read_reference_images): the same files, orientation and bounds."""
    return read_reference_images(path).images


def make_clip(c: ClipSettings, device: torch.device) -> ClipScorer:
    """The S1.2 CLIP backbone (transformers or open_clip), from a hub id or a local folder."""
    return ClipScorer(
        c.path,
        device,
        backend=c.backend,
        open_clip_model=c.open_clip_model,
        open_clip_pretrained=c.open_clip_pretrained,
    )


def backbone_ids(ev: EvalSettings) -> dict[str, str]:
    """The scoring backbones as metrics.json records them: a hub id or folder, or open_clip:<model>:<pretrained>."""
    c = ev.clip
    if c.backend == "open_clip":
        clip = f"open_clip:{c.open_clip_model or OPEN_CLIP_MODEL}:{c.open_clip_pretrained or OPEN_CLIP_PRETRAINED}"
    else:
        clip = c.path
    return {"clip": clip, "dino": ev.dino}


# ---------------------------------------------------------------------------------------------------------------
# the generation pipeline


def inference_scheduler(name: str | None, folder: Path | None, ddpm: SchedulerMixin) -> SchedulerMixin:
    """`name` (a diffusers scheduler class), else the model folder's own (DDIM/PNDM/...), else DDIM; configured
    from the folder's scheduler config when there is one, else from the training DDPM config."""
    config = dict(ddpm.config)
    file = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if file is not None and file.is_file():
        config = json.loads(file.read_text())
        if config.get("_class_name") != "DDPMScheduler":
            name = name or config.get("_class_name")
    name = name or "DDIMScheduler"
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ZoodipError(f"eval.scheduler={name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    return cls.from_config(config)


def assemble_pipeline(parts: Components, vae: AutoencoderKL, scheduler: SchedulerMixin) -> DiffusionPipeline:
    """A StableDiffusion(XL)Pipeline around already-loaded (possibly quantized) modules; no safety checker."""
    if parts.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=parts.text_encoders[0],
            text_encoder_2=parts.text_encoders[1],
            tokenizer=parts.tokenizers[0],
            tokenizer_2=parts.tokenizers[1],
            unet=parts.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=parts.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(
    model: ModelSettings,
    device: torch.device,
    embeddings: list[torch.Tensor] | None = None,
    placeholder: str | None = None,
    scheduler: str | None = None,
) -> DiffusionPipeline:
    """The pipeline for the images: `model`, quantized as in training (S1.3; `EvalSettings.generation_model`). With
    `embeddings` (per text encoder, from `read_embeddings`), the token `placeholder` is added with diffusers'
    load_textual_inversion. `scheduler`: a diffusers class name (None: the model folder's own, else DDIM)."""
    parts = model.load(device)
    pipe = assemble_pipeline(parts, parts.vae, inference_scheduler(scheduler, model.folder(), parts.scheduler))
    if embeddings is not None:
        if placeholder is None:
            raise ValueError("build_pipeline: embeddings need their placeholder token")
        for encoder, tokenizer, rows in zip(parts.text_encoders, parts.tokenizers, embeddings, strict=True):
            # grow the table first without transformers' mean resizing (slow, and the rows are overwritten anyway)
            encoder.resize_token_embeddings(len(tokenizer) + len(rows), mean_resizing=False)
            try:
                pipe.load_textual_inversion(
                    {placeholder: rows}, token=placeholder, text_encoder=encoder, tokenizer=tokenizer
                )
            except ValueError as err:
                raise ZoodipError(
                    f"the learned token does not fit {parts.source!r}: {str(err).splitlines()[0]}"
                ) from None
    return pipe


def generate(
    pipe: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    g: GenerationSettings,
    resolution: int,
    bar: tqdm | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed), `g.batch_size` at a time, each from its own seeded CPU generator."""
    images: list[Image.Image] = []
    step = g.batch_size
    for i in range(0, len(prompts), step):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + step]]
        out = pipe(
            prompt=prompts[i : i + step],
            generator=gens,
            num_inference_steps=g.num_inference_steps,
            guidance_scale=g.guidance_scale,
            height=resolution,
            width=resolution,
            output_type="pil",
        )
        images += out.images
        if bar is not None:
            bar.update(len(out.images))
    return images


# ---------------------------------------------------------------------------------------------------------------
# the full evaluation


def _mean(series: pd.Series) -> float | None:
    return float(series.mean()) if series.notna().any() else None


def _replace_dir(staging: Path, target: Path) -> None:
    """Put `staging` at `target`, replacing an earlier evaluation only once the new one is complete."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old / target.name)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def preflight(cfg: DictConfig) -> None:
    """Check, before training starts, what the end-of-training evaluation will need: the eval.* settings, the
    prompt table, the reference images and the CLIP / DINOv2 weights (loaded on the CPU once, then dropped)."""
    ev = eval_settings(prepare_config(cfg))
    if ev.kind == "toyworld":
        toyworld.evaluation_prompts(ev.data.placeholder, ev.data.subject)
        reference_images(ev.data.path)
        toyworld.load_scorer(ev.scorer)
        return
    prompt_set(ev)
    if ev.data.kind == "dreambooth":
        reference_images(ev.data.path)
    make_clip(ev.clip, torch.device("cpu"))
    DinoScorer(ev.dino)


def evaluate_run(
    run_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    tracker: Tracker | None = None,
    cfg: DictConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run (S1.1-S1.2, S3.3; see the module docstring) and write <run>/eval/. Returns metrics.

    `cfg` is the run's config (default: read from <run>/.hydra/config.yaml); `overrides` as in `prepare_config`.
    With `tracker` (the training run's), results go to that W&B run; without, to a new W&B run with job_type=eval in
    the training run's group, when the run's logger is wandb. Inputs are checked before any model is loaded: a bad
    embedding file raises ZoodipError and nothing is written.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    cfg = run_config(run_dir, overrides) if cfg is None else prepare_config(cfg, overrides)
    ev = eval_settings(cfg)
    if ev.kind == "toyworld":
        return evaluate_toyworld(run_dir, cfg, tracker, started)
    data = ev.data
    embeddings = read_embeddings(run_dir, data.placeholder, 2 if ev.model.is_sdxl else 1)
    ps = prompt_set(ev)
    refs = reference_images(data.path) if data.kind == "dreambooth" else None
    device = resolve_device(ev.device, ev.device_key)

    clip, dino = make_clip(ev.clip, device), DinoScorer(ev.dino, device)
    ref_clip = clip.embed_images(refs) if refs else None
    ref_dino = dino.embed_images(refs) if refs else None
    text_emb = clip.embed_texts(ps.texts)

    pipe = build_pipeline(ev.generation_model, device, embeddings, data.placeholder, ev.generation.scheduler)
    n, d, seed = ev.images_per_prompt, ev.diversity_images, ev.generation.seed
    jobs = [(p, seed + j) for p in range(len(ps.prompts)) for j in range(n)]
    jobs += [(0, seed + j) for j in range(n, d)]  # the rest of the diversity set (S3.3)
    scored = len(ps.prompts) * n

    t0 = time.perf_counter()
    images = _generate_all(pipe, [ps.prompts[p] for p, _ in jobs], [s for _, s in jobs], ev)
    gen_seconds = time.perf_counter() - t0

    gen_clip = clip.embed_images(images[:scored])
    gen_dino = dino.embed_images(images)
    prompt_idx = torch.tensor([p for p, _ in jobs[:scored]])
    frame = pd.DataFrame(
        {
            "prompt": [ps.prompts[p] for p, _ in jobs[:scored]],
            "seed": [s for _, s in jobs[:scored]],
            "clip_t": clip_t(text_emb[prompt_idx], gen_clip).tolist(),
            "clip_i": clip_i_per_image(ref_clip, gen_clip).tolist() if refs else float("nan"),
            "dino": dino_per_image(ref_dino, gen_dino[:scored]).tolist() if refs else float("nan"),
        }
    )
    diversity = [i for i, (p, s) in enumerate(jobs) if p == 0 and s < seed + d]
    per_prompt = [
        {
            "index": i,
            "prompt": ps.prompts[i],
            "text": ps.texts[i],
            "images": len(g),
            **{k: _mean(g[k]) for k in ("clip_t", "clip_i", "dino")},
        }
        for i, (_, g) in enumerate(frame.groupby("prompt", sort=False))
    ]
    metrics: dict[str, Any] = {
        "status": "completed",
        **{k: _mean(frame[k]) for k in ("clip_t", "clip_i", "dino")},
        "dino_inter": dino_inter(gen_dino[diversity]) if len(diversity) >= 2 else None,
        "per_prompt": per_prompt,
        "counts": {
            "prompts": len(ps.prompts),
            "images_per_prompt": n,
            "scored_images": scored,
            "diversity_images": len(diversity),
            "generated_images": len(images),
            "reference_images": len(refs) if refs else 0,
        },
        "backbones": backbone_ids(ev),
        "images_per_second": len(images) / gen_seconds if gen_seconds > 0 else None,
        "generation_seconds": gen_seconds,
        "class_noun": ps.class_noun,
        "living": ps.living,
        "use_class_token": ev.use_class_token,
        **_protocol(ev, pipe, device),
    }
    names = [f"p{p:02d}_s{s:04d}.png" for p, s in jobs]
    metrics["seconds"] = time.perf_counter() - started
    write_evaluation(run_dir, names, images, frame, metrics, refs)
    log_to_tracker(cfg, run_dir, tracker, metrics, frame, images[:scored], [p for p, _ in jobs[:scored]])
    return metrics


def _generate_all(pipe: DiffusionPipeline, prompts: list[str], seeds: list[int], ev: EvalSettings) -> list[Image.Image]:
    """`generate` with a progress bar over every image of an evaluation."""
    with tqdm(
        total=len(prompts), desc="zoodip-eval", unit="img", file=sys.stderr, dynamic_ncols=True, disable=not ev.progress
    ) as bar:
        return generate(pipe, prompts, seeds, ev.generation, ev.model.resolution, bar)


def _protocol(ev: EvalSettings, pipe: DiffusionPipeline, device: torch.device) -> dict[str, Any]:
    """The generation settings every metrics.json records."""
    model = ev.generation_model
    return {
        "placeholder_token": ev.data.placeholder,
        "seed": ev.generation.seed,
        "resolution": ev.model.resolution,
        "num_inference_steps": ev.generation.num_inference_steps,
        "guidance_scale": ev.generation.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "model": model.path or model.arch,
        "quantization": model.weights,
        "device": str(device),
    }


def write_evaluation(
    run_dir: Path,
    names: list[str],
    images: list[Image.Image],
    frame: pd.DataFrame,
    metrics: dict[str, Any],
    references: list[Image.Image] | None = None,
) -> None:
    """<run>/eval/: images/, scores.csv, metrics.json, grid.png (the references beside the first image of each
    prompt), built in a hidden folder and renamed into place."""
    staging = Path(tempfile.mkdtemp(prefix=".eval-", dir=run_dir))
    try:
        for name, im in zip(names, images, strict=True):
            atomic_write(staging / "images" / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
        atomic_write(staging / "scores.csv", lambda tmp: frame.to_csv(tmp, index=False))
        write_json(staging / "metrics.json", metrics)
        grid = reference_grid(references or [], first_of_each_prompt(names, images))
        atomic_write(staging / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
        _replace_dir(staging, run_dir / "eval")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def evaluate_toyworld(
    run_dir: Path,
    cfg: DictConfig,
    tracker: Tracker | None = None,
    started: float | None = None,
    embeddings: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """eval=toyworld: images of the learned token from `toyworld.evaluation_prompts`, judged by the world's scorer
    (`toyworld.score_images`: subject_accuracy, prompt_accuracy, image_similarity, diversity).

    `embeddings` (per text encoder, (k, d)) scores another token than the run's, e.g. the initializer word's."""
    started = time.perf_counter() if started is None else started
    ev = eval_settings(cfg)
    data = ev.data
    if embeddings is None:
        embeddings = read_embeddings(run_dir, data.placeholder, 2 if ev.model.is_sdxl else 1)
    prompts = toyworld.evaluation_prompts(data.placeholder, data.subject)
    refs = reference_images(data.path)
    scorer = toyworld.load_scorer(ev.scorer)
    device = resolve_device(ev.device, ev.device_key)
    pipe = build_pipeline(ev.generation_model, device, embeddings, data.placeholder, ev.generation.scheduler)
    n = ev.images_per_prompt
    jobs = [(p, ev.generation.seed + j) for p in range(len(prompts)) for j in range(n)]
    t0 = time.perf_counter()
    images = _generate_all(pipe, [prompts[p][0] for p, _ in jobs], [s for _, s in jobs], ev)
    gen_seconds = time.perf_counter() - t0
    rows, scores = toyworld.score_images(
        scorer,
        images,
        refs,
        data.subject,
        [prompts[p][1] for p, _ in jobs],
        [i for i, (p, _) in enumerate(jobs) if p == 0],
    )
    frame = pd.DataFrame({"prompt": [prompts[p][0] for p, _ in jobs], "seed": [s for _, s in jobs], **rows})
    per_prompt = [
        {
            "index": i,
            "prompt": prompt,
            "images": len(g),
            "subject_accuracy": float(g["subject_correct"].mean()),
            "prompt_accuracy": None if g["prompt_correct"].isna().all() else float(g["prompt_correct"].mean()),
            "image_similarity": float(g["image_similarity"].mean()),
        }
        for i, (prompt, g) in enumerate(frame.groupby("prompt", sort=False))
    ]
    metrics: dict[str, Any] = {
        "status": "completed",
        "kind": "toyworld",
        **scores,
        "per_prompt": per_prompt,
        "subject": data.subject,
        "counts": {
            "prompts": len(prompts),
            "images_per_prompt": n,
            "generated_images": len(images),
            "reference_images": len(refs),
        },
        "backbones": {"scorer": str(ev.scorer)},
        "images_per_second": len(images) / gen_seconds if gen_seconds > 0 else None,
        "generation_seconds": gen_seconds,
        **_protocol(ev, pipe, device),
    }
    metrics["seconds"] = time.perf_counter() - started
    write_evaluation(run_dir, [f"p{p:02d}_s{s:04d}.png" for p, s in jobs], images, frame, metrics, refs)
    log_to_tracker(cfg, run_dir, tracker, metrics, frame, images, [p for p, _ in jobs])
    return metrics


#: Means that go to the W&B summary as eval/<key>: the paper's scores, the toy world's, the speed.
SUMMARY_KEYS = (
    "clip_t",
    "clip_i",
    "dino",
    "dino_inter",
    "subject_accuracy",
    "prompt_accuracy",
    "image_similarity",
    "diversity",
    "images_per_second",
)


def log_to_tracker(
    cfg: DictConfig,
    run_dir: Path,
    tracker: Tracker | None,
    metrics: dict[str, Any],
    frame: pd.DataFrame,
    images: list[Image.Image],
    prompt_idx: list[int],
) -> None:
    """Means to the W&B summary (eval/*), a table of every scored image, a grid of each prompt's first image.

    Without `tracker`, a new W&B run (job_type=eval) in the training run's group, finished here.
    """
    own = tracker is None
    if own:
        try:
            train = read_json(run_dir / "metrics.json")
        except (OSError, ValueError):
            train = {}
        cfg.logger.group = ((train.get("wandb") or {}).get("group") or cfg.logger.group) or None
        cfg.logger.run_name = f"{cfg.logger.run_name or run_dir.name}-eval"
        tracker = Tracker(cfg, run_dir, job_type="eval")
    try:
        tracker.summary({f"eval/{k}": v for k, v in metrics.items() if k in SUMMARY_KEYS})
        columns = ["image", *frame.columns]
        rows = [[im, *row] for im, row in zip(images, frame.itertuples(index=False), strict=True)]
        tracker.log_table("eval/samples", columns, rows)
        firsts: dict[int, Image.Image] = {}
        for p, im in zip(prompt_idx, images, strict=True):
            firsts.setdefault(p, im)
        tracker.log_images("eval/grid", [image_grid(list(firsts.values()))], ["first image of each prompt"])
    finally:
        if own:
            tracker.finish()


# ---------------------------------------------------------------------------------------------------------------
# the cheap validation during training (eval.every = K)


def load_vae(m: ModelSettings, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The run's VAE alone, quantized like the rest of the model (training releases its own VAE)."""
    folder = m.folder()
    if folder is not None:
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    else:  # the same seeded weights as load_components
        with torch.random.fork_rng(devices=[]):
            vae = random_vae(arch_dir(m.arch), dtype, m.seed)
    vae.requires_grad_(False).eval()
    quantize_vae(vae, m.others or m.weights)  # INT4 runs keep the VAE INT8
    return vae.to(device)


@dataclass
class Validation:
    """What one validation gives the trainer: metrics (val/clip_i, val/clip_t) and captioned images."""

    metrics: dict[str, float]
    images: list[Image.Image] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


class Validator:
    """Every-K validation during training: `eval.validation.prompts` prompts x `eval.validation.images_per_prompt`
    images of the live token (fixed seeds, so W&B shows the concept appear on the same noise), scored by CLIP-I
    against the reference images (S1.2) and CLIP-T.

    It reuses the trainer's quantized UNet and text encoders (whose placeholder rows it sets to theta for the call)
    and loads, on its first call, only the VAE decoder (quantized as in training), the CLIP scorer and the references.
    """

    def __init__(self, cfg: DictConfig, parts: Components, text: TextConditioner) -> None:
        self.ev, self.parts, self.text = eval_settings(prepare_config(cfg)), parts, text
        self.pipe: DiffusionPipeline | None = None

    def _setup(self) -> None:
        ev, parts, data = self.ev, self.parts, self.ev.data
        k, n = ev.validation_prompts, ev.validation_images_per_prompt
        refs = reference_images(data.path) if data.kind == "dreambooth" else None
        if ev.kind == "toyworld":
            prompts = toyworld.evaluation_prompts(data.placeholder, data.subject)[:k]
            self.prompts = [p for p, _ in prompts for _ in range(n)]
            self.backgrounds = [b for _, b in prompts for _ in range(n)]
            self.scorer, self.refs = toyworld.load_scorer(ev.scorer), refs
        else:
            ps = prompt_set(ev)
            k = min(k, len(ps.prompts))
            self.prompts = [ps.prompts[p] for p in range(k) for _ in range(n)]
            self.clip = make_clip(ev.clip, parts.device)
            self.texts = self.clip.embed_texts([ps.texts[p] for p in range(k) for _ in range(n)])
            self.refs = self.clip.embed_images(refs) if refs else None
        self.seeds = [ev.generation.seed + j for _ in range(len(self.prompts) // n) for j in range(n)]
        scheduler = inference_scheduler(ev.generation.scheduler, ev.model.folder(), parts.scheduler)
        self.pipe = assemble_pipeline(parts, load_vae(ev.model, parts.device, parts.dtype), scheduler)

    def __call__(self, theta: torch.Tensor) -> Validation:
        """Generate and score with token `theta` (the trainer's flat fp32 vector)."""
        if self.pipe is None:
            self._setup()
        rows = self.text.split(theta.detach().float().reshape(-1))
        for emb, r in zip(self.text.embeddings, rows, strict=True):
            emb.values = r[None].to(self.parts.device, self.parts.dtype)
        try:
            images = generate(self.pipe, self.prompts, self.seeds, self.ev.generation, self.ev.model.resolution)
        finally:
            for emb in self.text.embeddings:
                emb.values = None
        captions = [f"{p} (seed {s})" for p, s in zip(self.prompts, self.seeds, strict=True)]
        if self.ev.kind == "toyworld":
            _, scores = toyworld.score_images(
                self.scorer, images, self.refs, self.ev.data.subject, self.backgrounds, list(range(len(images)))
            )
            return Validation({f"val/{k}": v for k, v in scores.items() if v is not None}, images, captions)
        gen = self.clip.embed_images(images)
        metrics = {"val/clip_t": float(clip_t(self.texts, gen).mean())}
        if self.refs is not None:
            metrics["val/clip_i"] = float(clip_i_per_image(self.refs, gen).mean())
        return Validation(metrics, images, captions)


# ---------------------------------------------------------------------------------------------------------------
# command line


def given_overrides(cfg: DictConfig, task: list[str], choices: dict[str, Any]) -> dict[str, Any]:
    """The command line's overrides as `prepare_config` applies them to the run's config: a group choice
    (eval=quick) becomes the composed group, a key (eval.images_per_prompt=2) its composed, typed value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(task):
        key = override.key_or_group
        if key == "run_dir" or key.startswith("hydra"):
            continue
        out[key] = cfg[key] if key in choices and "." not in key else OmegaConf.select(cfg, key)
    return out


def hydra_argv(argv: list[str]) -> list[str]:
    """zoodip-eval composes zoodip-train's own config (conf/train.yaml), so every override is checked against the
    same groups; run_dir is an extra key, and Hydra writes nothing into the run folder (no .hydra/, logs to stdout)."""
    out = []
    for arg in argv:
        if arg.startswith("run_dir="):
            value = arg.partition("=")[2]
            out += [f"+{arg}", f"hydra.run.dir={value}"]
        else:
            out.append(arg)
    return [*out, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def evaluate_task(cfg: DictConfig) -> None:
    """The task of the Hydra app (zoodip-train's config plus run_dir)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(cfg.run_dir)
    m = evaluate_run(run_dir, given_overrides(cfg, list(hc.overrides.task), dict(hc.runtime.choices)))
    keys = [k for k in SUMMARY_KEYS if k in m and k != "images_per_second"]
    fmt = {k: "n/a" if m[k] is None else f"{m[k]:.4f}" for k in keys}
    print(f"zoodip-eval: {' '.join(f'{k}={v}' for k, v in fmt.items())} -> {run_dir / 'eval'}", file=sys.stderr)


hydra_main = hydra_app("train", evaluate_task)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. No run_dir, or one that is no folder, is one sentence before Hydra starts; Hydra's own
    config errors (unknown key, bad override) exit with 2 too."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    given = [a.partition("=")[2].strip("'\"") for a in argv if a.startswith("run_dir=")]
    if not given or not given[-1]:
        fail(f"run_dir is required; {USAGE}")
    if not Path(given[-1]).expanduser().is_dir():
        fail(f"run_dir={given[-1]} is not a folder: give a zoodip-train run folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.argv = [sys.argv[0], *hydra_argv(argv)]
    hydra_main()


if __name__ == "__main__":
    main()
