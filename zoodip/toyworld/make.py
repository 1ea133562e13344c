"""zoodip-make-toyworld DIR: train the toy world's text-to-image model and scorer on a CPU, and check them.

    zoodip-make-toyworld DIR [--seed 0] [--minutes-scale 1.0]    # train (about 35-40 minutes on 2 cores)
    zoodip-make-toyworld --check [DIR] [--images 64] [--subjects] # text-following accuracy per attribute
                                                                  # (and each subject's, from its true words)

Training, in order (one seeded generator, so a seed gives one world):
1. the VAE (AutoencoderKL, 32x32x3 -> 8x8x4) on drawn images, MSE plus a tiny KL term;
2. the text encoder (CLIPTextModel, width 256, the world's ~600-token vocabulary) and the UNet
   (UNet2DConditionModel) jointly, as Stable Diffusion is trained: scaled_linear DDPM, epsilon prediction,
   captions dropped one time in ten for classifier-free guidance, an EMA of the weights;
3. the scorer (zoodip.toyworld.world.Scorer) on VAE reconstructions.

DIR is a diffusers folder (`StableDiffusionPipeline.from_pretrained(DIR)`) plus `scorer/`, `subjects/` (five
reference images of every <colour>_<shape> subject, DreamBooth layout, with `captions.json`) and `world.json`.
It is built in a hidden folder beside DIR and renamed into place: complete or absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from zoodip import ROOT
from zoodip.errors import ZoodipError, cli_errors
from zoodip.io import check_new_folder, new_folder
from zoodip.toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    MAX_LENGTH,
    SHAPES,
    Scene,
    Scorer,
    article,
    cosine_to_words,
    evaluation_prompts,
    full_caption,
    load_scorer,
    sample_world,
    save_scorer,
    scene_labels,
    score_images,
    world_tokenizer,
    write_subjects,
)

#: The world shipped with zoodip, loaded by `model=toyworld`.
SHIPPED = ROOT / "zoodip" / "assets" / "toyworld"
#: The training step counts: a whole build takes 35-40 minutes on 2 cores (BENCHMARKS.md).
STEPS = {"vae": 800, "unet": 2600, "scorer": 800}
TEXT_WIDTH = 256


def text_encoder_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="quick_gelu",
    )


def new_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def new_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule: 1000 steps, scaled_linear betas 0.00085-0.012, epsilon."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(images: np.ndarray, steps: int, gen: torch.Generator, progress: bool) -> AutoencoderKL:
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    for _ in tqdm(range(steps), desc="1/3 VAE", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        x = _to_tensor(images[torch.randint(len(images), (32,), generator=gen).numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: np.ndarray, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_to_tensor(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_text_to_image(
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    tokenizer,
    steps: int,
    gen: torch.Generator,
    progress: bool,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Text encoder and UNet trained jointly on epsilon-prediction; returns their EMA weights."""
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id))
    unet = new_unet()
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    scheduler = sd_scheduler()
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup=200))
    ema_te, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    mean, std = latents
    bar = tqdm(range(steps), desc="2/3 text encoder + UNet", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(mean), (64,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=gen) < 0.1
        batch_ids[drop] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_te.eval().requires_grad_(False), ema_unet.eval().requires_grad_(False)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.decode(vae.encode(_to_tensor(images[i : i + batch])).latent_dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def train_scorer(
    images: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, gen: torch.Generator, progress: bool
) -> Scorer:
    scorer = Scorer()
    opt = torch.optim.AdamW(scorer.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps))
    scorer.train()
    for _ in tqdm(range(steps), desc="3/3 scorer", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        idx = torch.randint(len(images), (128,), generator=gen)
        x = images[idx] + 0.03 * torch.randn(images[idx].shape, generator=gen)
        out = scorer(x)
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in ("shape", "colour", "background"))
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    return scorer.eval()


def scorer_accuracy(scorer: Scorer, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    pred = scorer.judge(images)
    return {k: float((pred[k] == labels[k]).float().mean()) for k in ("shape", "colour", "background")}


def all_subjects() -> list[str]:
    return [f"{c}_{s}" for c in COLOURS for s in SHAPES]


def make_toyworld(directory: str | Path, seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict:
    """Train and write the world (see the module docstring). Returns world.json's contents."""
    target = check_new_folder(directory)  # before half an hour of training
    steps = {k: max(1, int(v * scale)) for k, v in STEPS.items()}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    images, _, captions = sample_world(max(2000, int(60000 * min(1.0, scale * 2))), seed)
    tokenizer = world_tokenizer()
    t0 = time.perf_counter()
    vae = train_vae(images, steps["vae"], gen, progress)
    mean, std = encode_all(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    timings["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_encoder, unet = train_text_to_image(
        (mean * scaling, std * scaling), captions, tokenizer, steps["unet"], gen, progress
    )
    timings["text_to_image"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scorer_images, scorer_scenes, _ = sample_world(max(2000, int(20000 * min(1.0, scale * 2))), seed + 1)
    recon = reconstruct(vae, scorer_images)
    labels = scene_labels(scorer_scenes)
    scorer = train_scorer(
        torch.cat([recon, _to_tensor(scorer_images)]),
        {k: torch.cat([v, v]) for k, v in labels.items()},
        steps["scorer"],
        gen,
        progress,
    )
    held_images, held_scenes, _ = sample_world(2000, seed + 2)
    held_recon = reconstruct(vae, held_images)
    scorer_acc = scorer_accuracy(scorer, held_recon, scene_labels(held_scenes))
    timings["scorer"] = time.perf_counter() - t0

    with new_folder(target) as staging:
        pipe = StableDiffusionPipeline(
            vae=vae.half(),
            text_encoder=text_encoder.half(),
            tokenizer=tokenizer,
            unet=unet.half(),
            scheduler=DDIMScheduler.from_config(sd_scheduler().config, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging)
        save_scorer(scorer.half(), staging / "scorer")
        write_subjects(staging / "subjects", all_subjects(), seed=seed)
        info = {
            "seed": seed,
            "steps": steps,
            "seconds": time.perf_counter() - started,
            "timings": timings,
            "scorer_accuracy_on_reconstructions": scorer_acc,
            "vae_scaling_factor": scaling,
            "token_width": TEXT_WIDTH,
            "vocabulary": len(tokenizer),
            "threads": torch.get_num_threads(),
        }
        (staging / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------------------
# acceptance: does the model draw what the caption asks for?


def load_world_pipeline(directory: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    folder = Path(directory).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ZoodipError(f"{folder} is not a toy world (no model_index.json); run zoodip-make-toyworld {folder}")
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def acceptance_scenes() -> list[Scene]:
    """Every (shape, colour, background) the acceptance check prompts: 6 x 6 x 6 = 216 captions."""
    return [Scene(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS if b != c]


@torch.no_grad()
def text_following(
    pipe: StableDiffusionPipeline,
    scorer: Scorer,
    scenes: list[Scene],
    images_per_caption: int = 64,
    guidance_scale: float = 5.0,
    steps: int = 25,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Fraction of images whose shape, colour and background the scorer reads as the caption asked (and all
    three together), `images_per_caption` images per caption with DDIM."""
    hits = {"shape": [], "colour": [], "background": [], "all": []}
    for i, scene in enumerate(tqdm(scenes, desc="text following", disable=not progress, file=sys.stderr)):
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        out = pipe(
            full_caption(scene),
            num_images_per_prompt=images_per_caption,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
        ).images
        pred = scorer.judge(out.float() * 2 - 1)
        truth = scene_labels([scene] * len(out))
        ok = {k: pred[k] == truth[k] for k in ("shape", "colour", "background")}
        for k, v in ok.items():
            hits[k].append(v.float())
        hits["all"].append((ok["shape"] & ok["colour"] & ok["background"]).float())
    return {k: float(torch.cat(v).mean()) for k, v in hits.items()}


ACCEPTANCE = {"shape": 0.90, "colour": 0.99, "background": 0.99}
GOOD_SUBJECT = 0.9  # a subject is good when its true words give at least this subject_accuracy


@torch.no_grad()
def subject_report(
    pipe: StableDiffusionPipeline,
    scorer: Scorer,
    directory: Path,
    images: int = 10,
    initializer: str = "object",
    progress: bool = True,
) -> list[dict]:
    """Per subject: the toy-world evaluation (eval=toyworld's prompts, guidance 5, 25 DDIM steps) with the true words
    ("an orange cross") in place of a learned token, and the cosine of the initializer word with the subject's
    colour and shape words in the text encoder's table. `good` marks subject_accuracy >= GOOD_SUBJECT."""
    table = pipe.text_encoder.get_input_embeddings().weight.float()
    out = []
    for subject in tqdm(all_subjects(), desc="subjects", disable=not progress, file=sys.stderr):
        colour, shape = subject.split("_")
        words = f"{article(colour)} {colour} {shape}"
        prompts = evaluation_prompts(words, subject)
        generated = []
        for k, (prompt, _) in enumerate(prompts):
            gen = torch.Generator().manual_seed(k)
            generated += pipe(
                prompt,
                num_images_per_prompt=images,
                num_inference_steps=25,
                guidance_scale=5.0,
                generator=gen,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
            ).images
        refs = [Image.open(p) for p in sorted((directory / "subjects" / subject).glob("*.png"))]
        _, scores = score_images(
            scorer, generated, refs, subject, [b for _, b in prompts for _ in range(images)], list(range(images))
        )
        cos = cosine_to_words(table, pipe.tokenizer, initializer, [colour, shape])
        out.append(
            {
                "subject": subject,
                **{k: scores[k] for k in ("subject_accuracy", "prompt_accuracy")},
                "initializer_cosine_colour": cos[colour],
                "initializer_cosine_shape": cos[shape],
                "good": scores["subject_accuracy"] >= GOOD_SUBJECT,
            }
        )
    return out


def check(directory: str | Path, images: int = 64, scenes: list[Scene] | None = None, progress: bool = True) -> dict:
    folder = Path(directory).expanduser()
    pipe = load_world_pipeline(folder)
    scorer = load_scorer(folder / "scorer")
    held_images, held_scenes, _ = sample_world(1000, 987654)
    vae = pipe.vae
    scorer_acc = scorer_accuracy(scorer, reconstruct(vae, held_images), scene_labels(held_scenes))
    result = text_following(pipe, scorer, scenes or acceptance_scenes(), images, progress=progress)
    return {"text_following": result, "scorer_on_reconstructions": scorer_acc, "images_per_caption": images}


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="zoodip-make-toyworld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directory", nargs="?", help="folder to create (or, with --check, the world to check)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    parser.add_argument(
        "--minutes-scale", type=float, default=1.0, help="scale every step count and the data (default 1)"
    )
    parser.add_argument("--check", action="store_true", help="print text-following accuracy per attribute")
    parser.add_argument("--images", type=int, default=64, help="--check: images per caption (default 64)")
    parser.add_argument(
        "--subjects",
        action="store_true",
        help="with --check: also each subject's accuracy from its true words (the good subjects)",
    )
    args = parser.parse_args(argv)
    if args.check:
        result = check(args.directory or SHIPPED, args.images)
        print(json.dumps(result, indent=2))
        tf, sc = result["text_following"], result["scorer_on_reconstructions"]
        rows = [(k, tf[k], ACCEPTANCE.get(k)) for k in ("shape", "colour", "background", "all")]
        rows += [(f"scorer {k}", sc[k], 0.98) for k in sc]
        print(f"{'attribute':<20} {'accuracy':>9} {'target':>7}  verdict")
        for name, value, want in rows:
            verdict = "" if want is None else ("pass" if value >= want else "MISS")
            print(f"{name:<20} {value:>9.3f} {'' if want is None else f'{want:>7.2f}'}  {verdict}")
        if args.subjects:
            folder = Path(args.directory or SHIPPED)
            report = subject_report(load_world_pipeline(folder), load_scorer(folder / "scorer"), folder)
            print(
                f"\n{'subject':<16} {'subject_acc':>11} {'prompt_acc':>10} {'cos(init,colour)':>16} "
                f"{'cos(init,shape)':>15}  good"
            )
            for r in report:
                print(
                    f"{r['subject']:<16} {r['subject_accuracy']:>11.3f} {r['prompt_accuracy']:>10.3f} "
                    f"{r['initializer_cosine_colour']:>16.3f} {r['initializer_cosine_shape']:>15.3f}  "
                    f"{'yes' if r['good'] else ''}"
                )
        return
    if not args.directory:
        parser.error("DIR is required")
    if args.minutes_scale <= 0:
        raise ZoodipError(f"--minutes-scale must be > 0, got {args.minutes_scale}")
    info = make_toyworld(args.directory, seed=args.seed, scale=args.minutes_scale)
    print(json.dumps(info, indent=2))
    print(f"wrote the toy world to {args.directory} in {info['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
