"""zoodip-train: personalize a (quantized) diffusion model with zeroth-order textual inversion (Algorithm 1)."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from tqdm import tqdm

from zoodip import __version__
from zoodip.analysis.pictures import image_grid, write_run_pictures
from zoodip.cli import hydra_app
from zoodip.data.dataset import (
    TEMPLATES,
    DataSettings,
    Reference,
    encode_latents,
    load_captions,
    read_caption_files,
    read_reference_images,
)
from zoodip.data.planted import PlantedTask
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import SUMMARY_KEYS, Validator, evaluate_run, preflight
from zoodip.io import atomic_write, read_json, write_json
from zoodip.method.estimators import LossFn, backprop
from zoodip.method.methods import CMAES, METHODS, GradientMethod, StepResult, build_method
from zoodip.method.objective import Objective, TextConditioner
from zoodip.method.timesteps import TimestepSampler
from zoodip.models.embeddings import write_run_sdxl_embedding
from zoodip.models.loading import (
    peak_rss_bytes,
    resolve_device,
    resolve_dtype,
    set_cpu_memory,
)
from zoodip.models.quantize import forward_mode, quantized_fraction, weights_by_component
from zoodip.runtime import distributed, preemption
from zoodip.runtime.checkpoint import (
    TrainState,
    check_resumable,
    check_same_math,
    load_checkpoint,
    locate_checkpoint,
    run_config,
    save_checkpoint,
)
from zoodip.runtime.distributed import Group
from zoodip.runtime.health import Health
from zoodip.runtime.preemption import EXIT_PREEMPTED, Preempted
from zoodip.runtime.runlock import run_lock
from zoodip.runtime.tracking import Tracker
from zoodip.schema import check_config, data_settings, loop_settings, method_name, method_settings, model_settings

log = logging.getLogger("zoodip.runtime.train")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def save_embeddings(run_dir: Path, text: TextConditioner, theta: torch.Tensor) -> None:
    """learned_embeds.safetensors ({placeholder: (k, d)}, as diffusers' load_textual_inversion reads it);
    for SDXL also learned_embeds_2.safetensors for the second text encoder."""
    for i, rows in enumerate(text.split(theta.detach().float().cpu())):
        name = "learned_embeds.safetensors" if i == 0 else f"learned_embeds_{i + 1}.safetensors"
        tensors = {text.placeholder: rows.contiguous()}
        atomic_write(run_dir / name, lambda tmp, t=tensors: save_file(t, str(tmp)))
    write_run_sdxl_embedding(run_dir)  # SDXL: also the one-file clip_l / clip_g layout of A1111 and ComfyUI


def keep_token(
    run_dir: Path, text: TextConditioner, theta: torch.Tensor, step: int, forward_passes: int, wall_seconds: float
) -> None:
    """tokens/fwd-<forward passes>.safetensors: the flat token at this point of training (train.keep_tokens_every),
    for curves against forward passes and against training wall time (zoodip-compare, zoodip-study's records)."""
    tensors = {"theta": theta.detach().float().cpu().contiguous().clone()}
    meta = {
        "placeholder": text.placeholder,
        "step": str(step),
        "forward_passes": str(forward_passes),
        "wall_seconds": f"{wall_seconds:.3f}",
    }
    path = run_dir / "tokens" / f"fwd-{forward_passes:09d}.safetensors"
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def apply_forward_budget(cfg: DictConfig) -> None:
    """train.forward_budget: train.steps becomes the budget over the method's forward passes per step (as
    metrics.json counts them: first-order TI's backward is not counted)."""
    budget = cfg.train.get("forward_budget")
    name = method_name(cfg)
    if budget is None or name not in METHODS:
        return
    per_step = METHODS[name].passes(method_settings(cfg))
    if budget < per_step:
        raise ZoodipError(f"train.forward_budget={budget} is less than one step of {name} ({per_step} forward passes)")
    with open_dict(cfg):
        cfg.train.steps = int(budget) // per_step


def find_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return locate_checkpoint(run_dir)
    path = locate_checkpoint(resume)
    if path is None:
        raise ZoodipError(f"train.resume={resume!r}: no checkpoint found at {Path(resume).expanduser()}")
    return path


def window_mean(values: list[float], first: bool) -> float:
    """Mean of the first (or last) 10% of the per-step losses, between 1 and 100 steps, ignoring NaNs."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan")
    w = max(1, min(100, len(finite) // 10))
    chunk = finite[:w] if first else finite[-w:]
    return sum(chunk) / len(chunk)


@dataclass
class Setup:
    """Everything the loop needs, built once by `setup`."""

    parts: Any
    text: TextConditioner
    sampler: TimestepSampler
    data: Reference | PlantedTask
    objective: Objective
    theta: torch.nn.Parameter
    method: GradientMethod | CMAES
    validator: Validator | None
    initializer: str
    quantized_fraction: float
    weights_by_component: dict[str, str]
    reference: Objective | None = None  # train.grad_cosine_every: the fp32 unquantized copy for the true gradient


def load_training_data(
    d: DataSettings, run_dir: Path, write: bool = True
) -> tuple[torch.Tensor, list[str], list[str] | None]:
    """The reference images (oriented, cropped, resized: read before a multi-GB model is loaded), their names and
    captions; references.png shows exactly what the model is trained on."""
    refs = read_reference_images(d.path, d.resolution)
    sheet = image_grid(refs.images, cols=min(5, len(refs.images)))
    if write:
        atomic_write(run_dir / "references.png", lambda tmp: sheet.save(tmp, format="PNG"))
    captions = load_captions(d.captions, d.subject, refs.names, refs.entries) or read_caption_files(
        d.path, refs.names, d.placeholder
    )
    if captions is None and d.template != "style":
        log.warning(
            "training on the %r templates, not captions: the paper trains ZOODiP on comprehensive captions (S1.1); "
            "set data.captions=<captions.json> or put <image>.txt beside each image",
            d.template,
        )
    return refs.tensor(), refs.names, captions


def setup(cfg: DictConfig, run_dir: Path, device: torch.device, main: bool = True) -> Setup:
    """Load the model, the placeholder token, the data, the timestep sampler (Eq. 9) and the method (`main`: this
    process writes files; the other ranks of a distributed run do not)."""
    model, d = model_settings(cfg), data_settings(cfg)
    dtype = resolve_dtype(model.dtype, device)
    if d.kind == "dreambooth":
        images, names, captions = load_training_data(d, run_dir, write=main)
    initializer, source = d.initializer_word(), d.initializer_source
    if source == "model.initializer_token" and d.kind == "dreambooth":
        log.warning(
            "data.subject=%s is not a DreamBooth subject and data.initializer_token is not set: the token "
            "starts from the model's word %r (model.initializer_token); Textual Inversion and the paper start "
            "from one word of the subject's class: data.initializer_token=<word>",
            d.subject,
            initializer,
        )
    weights = "unquantized" if model.weights == "none" else model.weights
    log.info("loading %s (%s, %s weights, %s activations) on %s", model.arch, model.init, weights, dtype, device)
    parts = model.load(device, dtype)
    num_t = parts.scheduler.config.num_train_timesteps
    if cfg.puts.kind == "puts" and cfg.puts.t_high > num_t:
        raise ZoodipError(f"puts.t_high={cfg.puts.t_high} is beyond the model's {num_t} training timesteps")
    components = parts.text_encoders + [parts.unet] + ([parts.vae] if parts.vae is not None else [])
    frac, weight_types = quantized_fraction(components), weights_by_component(parts)

    text = TextConditioner(
        parts, d.placeholder, initializer, d.num_vectors, source, suggest=[cfg.model.get("initializer_token")]
    )
    sampler = TimestepSampler(cfg.puts.kind, cfg.puts.t_low, cfg.puts.t_high, parts.scheduler.alphas_cumprod)
    theta0 = text.initial_theta(d.init_embedding, d.allow_pickle)
    if d.kind == "dreambooth":
        mean, std = encode_latents(parts.vae, images, device)
        prompts = [[c] for c in captions] if captions else [TEMPLATES[d.template]] * len(names)
        # flip_p: the official code's default augmentation (the paper is silent)
        flipped = encode_latents(parts.vae, images.flip(-1), device) if d.flip_p > 0 else None
        data = Reference(mean, std, prompts, flipped, d.flip_p)
    else:
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)  # the VAE's downsampling: 8 for every SD
        side = d.resolution // factor
        data = PlantedTask(
            theta0,
            (parts.unet.config.in_channels, side, side),
            rank=d.planted_rank,
            scale=d.planted_scale,
            num_images=d.num_images,
            eval_points=d.eval_points,
            seed=d.seed,
            sample_timestep=sampler,
        )
    parts.release_vae()  # reference latents are encoded: training holds no VAE

    validator = Validator(cfg, parts, text) if int(cfg.eval.every) > 0 and main else None
    if cfg.train.compile and device.type == "cpu":
        log.warning("train.compile=%s on the CPU: measured slower than eager there (BENCHMARKS.md)", cfg.train.compile)
    objective = Objective(
        parts, text, bool(cfg.estimator.batched), int(cfg.estimator.max_batch), cfg.train.compile or None
    )
    theta = torch.nn.Parameter(theta0.clone())
    tables = [e.weight for e in text.embeddings]
    method = build_method(method_settings(cfg), theta, tables, d.num_vectors)
    reference = None
    if int(cfg.train.grad_cosine_every) > 0:  # diagnostics only: a second, fp32 and unquantized, copy of the model
        exact = replace(model, weights="none", others="none", dequantized_copy=None).load(device, torch.float32)
        exact.release_vae()
        reference_text = TextConditioner(exact, d.placeholder, initializer, d.num_vectors)
        reference = Objective(exact, reference_text)
    return Setup(
        parts, text, sampler, data, objective, theta, method, validator, initializer, frac, weight_types, reference
    )


def per_candidate_losses(
    objective: Objective, data: Reference | PlantedTask, generator: torch.Generator, t: int
) -> LossFn:
    """Each candidate at its own latent, noise and prompt, the timestep shared (GF-TI's own code; CMAES with
    method.shared_sample=false)."""

    def losses(thetas: torch.Tensor) -> torch.Tensor:
        out = []
        for theta in thetas:
            z0, prompt = data.sample(generator)
            objective.set_sample(z0, torch.randn(z0.shape, generator=generator), t, prompt)
            if isinstance(data, PlantedTask):
                with torch.no_grad():
                    data.set_target(objective)
            out.append(objective.losses(theta[None]))
        return torch.cat(out)

    return losses


def training_step(
    method: GradientMethod | CMAES,
    objective: Objective,
    data: Reference | PlantedTask | Any,
    sampler: TimestepSampler,
    generator: torch.Generator,
    step: int,
    quant: str,
    stratified: bool = False,
    reference: Objective | None = None,
    group: Group | None = None,
) -> tuple[StepResult, int]:
    """One iteration of Algorithm 1 (zoodip-bench times this same function): draw (z, y) from the references,
    t from the sampler (PUTS, Eq. 9), eps ~ N(0, I), shared by every loss of the step (common random numbers);
    then the method's update of theta.

    `stratified` (puts.stratified): each group of evaluations the estimator marks (its +/- pairs) gets its own t from
    `sampler.strata`, the rest of the sample shared. `reference` (train.grad_cosine_every): an fp32 unquantized copy
    whose exact gradient at this step's sample is compared with the method's estimate (grad_cosine, update_cosine).
    `group` (train.distributed): each rank evaluates its share of the candidates, the losses are all-reduced."""
    z0, prompt = data.sample(generator)
    t = sampler(generator)
    noise = torch.randn(z0.shape, generator=generator)

    def context() -> contextlib.AbstractContextManager:
        return torch.enable_grad() if method.autograd else forward_mode(quant)

    def set_sample(timestep: int) -> None:
        objective.set_sample(z0, noise, timestep, prompt)
        if isinstance(data, PlantedTask):  # a constant: no_grad, not inference_mode, since backprop's loss saves it
            with torch.no_grad():
                data.set_target(objective)

    with context():
        set_sample(t)
    losses = objective.losses if method.shared_sample else per_candidate_losses(objective, data, generator, t)
    if group is not None and method.shared_sample:

        def count(k: int) -> None:
            objective.forward_passes += k

        losses = group.spread(losses, count)

    def stratified_losses(thetas: torch.Tensor, groups: list[int]) -> torch.Tensor:
        out = torch.empty(len(groups))
        for stratum, timestep in enumerate(sampler.strata(generator, max(groups) + 1)):
            rows = [i for i, g in enumerate(groups) if g == stratum]
            set_sample(timestep)
            out[rows] = losses(thetas[rows]).float().cpu()
        return out

    def loss_fn(thetas: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
        with context():  # the model's forwards only: the update runs outside
            return stratified_losses(thetas, groups) if stratified and groups else losses(thetas)

    true_grad = None
    if reference is not None:  # before the step changes theta; cloned: autograd cannot save an inference tensor
        reference.set_sample(z0, noise, t, prompt, target=objective.target.clone())
        true_grad = backprop(reference.losses, method.theta.detach()).grad
    result = method.step(loss_fn, step)
    if true_grad is not None and result.estimate is not None:
        result.log["grad_cosine"] = float(F.cosine_similarity(result.estimate, true_grad, dim=0))
        result.log["update_cosine"] = float(F.cosine_similarity(result.applied, true_grad, dim=0))
    return result, t


def train(cfg: DictConfig, run_dir: Path, tracker: Tracker, group: Group | None = None) -> dict[str, Any]:
    """Algorithm 1 of the paper, with resumable state. Returns the metrics written to metrics.json. With a `group` of
    several ranks (train.distributed) every rank runs this loop on the same seeds, evaluating its share of each step's
    forward passes; rank 0 alone writes."""
    group = group or Group()
    writes = group.main
    group.go()  # every rank starts only once rank 0 has passed its checks (lock, resume, evaluation preflight)
    device = resolve_device(cfg.train.device)
    if group.active and device.type == "cuda":  # one GPU per process (each SLURM task may see only its own)
        device = torch.device("cuda", group.local_rank % torch.cuda.device_count())
    if device.type == "cpu":
        set_cpu_memory(cfg.train.cpu_memory)
    s = setup(cfg, run_dir, device, main=writes)
    loop = loop_settings(cfg)
    quant, theta, method, objective = loop.quantization, s.theta, s.method, s.objective
    planted = s.data if isinstance(s.data, PlantedTask) else None
    generator = torch.Generator().manual_seed(loop.seed)

    history: list[dict[str, Any]] = []
    start, nonfinite, wall_before, initial_eval = 0, 0, 0.0, None
    checkpoint = find_checkpoint(loop.resume, run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if state.theta.numel() != theta.numel():
            raise ZoodipError(
                f"checkpoint {checkpoint} holds a token of size {state.theta.numel()}, not {theta.numel()}"
            )
        with torch.no_grad():
            theta.copy_(state.theta)
        method.load_state_dict(
            {"optimizer": state.optimizer, "sg": state.sg, "estimator": state.estimator, "cma": state.cma}
        )
        generator.set_state(state.generator)
        history, start, nonfinite = state.history, state.step, state.nonfinite
        wall_before, initial_eval = state.wall_seconds, state.initial_eval_loss
        objective.forward_passes = state.forward_passes
        log.info("resumed from %s at step %d", checkpoint, start)
    if planted is not None and initial_eval is None:
        with forward_mode(quant):
            initial_eval = planted.eval_loss(objective, planted.theta0)

    def write_checkpoint(step: int, wall: float) -> None:
        method_state = method.state_dict()
        state = TrainState(
            step=step,
            theta=theta.detach(),
            optimizer=method_state["optimizer"],
            sg=method_state["sg"],
            generator=generator.get_state(),
            history=history,
            nonfinite=nonfinite,
            wall_seconds=wall,
            initial_eval_loss=initial_eval,
            forward_passes=objective.forward_passes,
            config=run_config(cfg),
            zoodip_version=__version__,
            estimator=method_state.get("estimator") or None,
            cma=method_state.get("cma"),
        )
        save_checkpoint(run_dir / "checkpoints", state)

    steps = loop.steps
    t_start = time.perf_counter()
    bar = tqdm(
        range(start + 1, steps + 1),
        initial=start,
        total=steps,
        desc="zoodip",
        disable=not loop.progress or not writes,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
    )
    health = Health(loop.max_bad_steps, [r["loss"] for r in history])
    if group.stop_requested(bool(preemption.requested())):  # a signal while the model loaded (on any rank)
        raise Preempted(preemption.requested() or signal.SIGTERM, start)
    stratified, cosine_every, keep_every = loop.stratified, loop.grad_cosine_every, loop.keep_tokens_every
    if keep_every and start == 0 and writes:
        keep_token(run_dir, s.text, theta, 0, 0, wall_before)
    for step in bar:
        reference = s.reference if cosine_every and step % cosine_every == 0 else None
        passes_before = objective.forward_passes
        result, t = training_step(
            method, objective, s.data, s.sampler, generator, step, quant, stratified, reference, group
        )
        crossed = objective.forward_passes // keep_every > passes_before // keep_every if keep_every else False
        if writes and (crossed or (keep_every and step == steps)):  # and the final token, wherever the budget ends
            wall = wall_before + time.perf_counter() - t_start
            keep_token(run_dir, s.text, theta, step, objective.forward_passes, wall)
        divergence = health.observe(result.loss if result.finite else float("nan"))
        if divergence:
            tracker.warn("divergence", divergence, step)
        if not result.finite:
            nonfinite += 1
            if nonfinite > loop.max_nonfinite or health.failed:
                if writes:  # non-finite steps skip their update: the last good token
                    save_embeddings(run_dir, s.text, theta)
                too_many = f"{nonfinite} steps had a non-finite loss (train.max_nonfinite={loop.max_nonfinite})"
                raise FloatingPointError(health.failed or too_many)
        row = {
            "step": step,
            "forward_passes": objective.forward_passes,
            "loss": result.loss if result.finite else float("nan"),
            "timestep": t,
            **result.log,
            "token_norm": float(theta.detach().norm()),
            "peak_memory_bytes": peak_memory_bytes(device),
        }
        refreshed = "sg_istar_over_tau" in row or "grad_cosine" in row
        if step % loop.log_every == 0 or refreshed or step == steps:
            history.append(row)
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if s.validator is not None and step % loop.validate_every == 0:  # a few images and a score, to watch
            val = s.validator(theta.detach())
            tracker.log(val.metrics, step=step)
            tracker.log_images("val/images", val.images, val.captions, step=step)
        if loop.progress:
            bar.set_postfix(loss=f"{row['loss']:.4g}", mem=f"{row['peak_memory_bytes'] / 2**30:.2f}G", refresh=False)
        elapsed = wall_before + time.perf_counter() - t_start
        if writes and loop.save_every and step % loop.save_every == 0:
            save_embeddings(run_dir, s.text, theta)
        if writes and loop.checkpoint_every and step % loop.checkpoint_every == 0:
            write_checkpoint(step, elapsed)
            write_history(run_dir, history)
        # SIGTERM / SIGINT / SIGUSR2 on any rank: this step is done on every rank, all stop here
        stop = group.stop_requested(bool(preemption.requested())) if step < steps else False
        if stop:
            if writes:
                write_checkpoint(step, elapsed)
                write_history(run_dir, history)
                save_embeddings(run_dir, s.text, theta)
            group.barrier()  # no rank exits (and makes torchrun signal the others) before rank 0's checkpoint
            raise Preempted(preemption.requested() or signal.SIGTERM, step)
    bar.close()
    session_seconds = time.perf_counter() - t_start
    if writes:
        save_embeddings(run_dir, s.text, theta)
        write_history(run_dir, history)
        istar = [r["sg_istar_over_tau"] for r in history if "sg_istar_over_tau" in r]
        write_run_pictures(run_dir, history, istar, tracker)
    metrics = summarize(cfg, s, history, start, nonfinite, wall_before + session_seconds, session_seconds, device)
    if group.active:
        ran = max(1, steps - start)
        metrics["distributed"] = {
            "world_size": group.world,
            "floats_per_step": group.floats_sent / ran,
            "collectives_per_step": group.collectives / ran,
        }
        log.info(
            "train.distributed: %d ranks; each sent %.1f floats per step in %.1f collectives (the losses, and the stop "
            "flag)",
            group.world,
            group.floats_sent / ran,
            group.collectives / ran,
        )
    if planted is not None:
        with forward_mode(quant):
            final_eval = planted.eval_loss(objective, theta.detach())
        metrics.update(
            initial_eval_loss=initial_eval,
            final_eval_loss=final_eval,
            loss_ratio=final_eval / initial_eval if initial_eval else None,
            planted_cosine=planted.cosine(theta.detach()),
        )
    return metrics


def summarize(
    cfg: DictConfig,
    s: Setup,
    history: list[dict[str, Any]],
    start: int,
    nonfinite: int,
    wall: float,
    session_seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """metrics.json's training fields."""
    steps = int(cfg.train.steps)
    losses = [r["loss"] for r in history]
    ratios = [r["sg_istar_over_tau"] for r in history if "sg_istar_over_tau" in r]
    passes = s.objective.forward_passes
    return {
        "status": "completed",
        "error": None,
        "method": method_name(cfg),
        "steps": steps,
        "resumed_from_step": start or None,
        "initial_loss": window_mean(losses, first=True),
        "final_loss": window_mean(losses, first=False),
        "wall_seconds": wall,
        "iters_per_second": (steps - start) / session_seconds if session_seconds > 0 else None,
        "forward_passes": passes,
        "forward_passes_per_step": passes / max(1, steps),
        "peak_memory_bytes": peak_memory_bytes(device),
        "quantized_fraction": s.quantized_fraction,
        "weights_by_component": s.weights_by_component,
        "nonfinite_steps": nonfinite,
        "sg_istar_over_tau": ratios,
        "sg_istar_over_tau_mean": sum(ratios) / len(ratios) if ratios else None,
        "token_dim": s.theta.numel(),
        "device": str(device),
        "dtype": str(s.parts.dtype).removeprefix("torch."),
        "model_source": s.parts.source,
        "placeholder_token": s.text.placeholder,
        "initializer_token": s.initializer,
    }


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(history)
    atomic_write(run_dir / "history.csv", lambda tmp: frame.to_csv(tmp, index=False))


def run(cfg: DictConfig, run_dir: Path, multirun: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Train, then write metrics.json whatever happened. Bad input raises ZoodipError (exit code 2); SIGTERM, SIGINT
    or SIGUSR2 end the current step, checkpoint and raise Preempted (exit code EXIT_PREEMPTED). One run at a time
    works in `run_dir` (its lock file); a refused run writes nothing there, except in a sweep (`multirun`), where
    its metrics.json says failed and why."""
    try:  # types, limits, choices, unknown keys, rules between knobs: before anything is loaded
        check_config(cfg)
        apply_forward_budget(cfg)
    except ZoodipError as err:
        if multirun and not (run_dir / "metrics.json").exists():  # a sweep's refused cell says why in its folder
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "metrics.json", {"status": "failed", "error": f"ZoodipError: {err}"})
        raise
    group = distributed.start(bool(cfg.train.distributed), resolve_device(cfg.train.device))
    try:
        if group.active:  # every rank works in rank 0's folder (each rank's Hydra may have named its own)
            run_dir = Path(group.broadcast_object(str(run_dir)))
        if not group.main:
            return follow(cfg, run_dir, group)
        return lead(cfg, run_dir, multirun, run_name, group)
    except BaseException as err:
        group.refuse(f"{type(err).__name__}: {err}")  # rank 0 stopped before training: the others stop too
        raise


def follow(cfg: DictConfig, run_dir: Path, group: Group) -> dict[str, Any]:
    """A rank other than 0 of a distributed run: the same loop on the same seeds, reading rank 0's folder (its
    checkpoint, a completed run) and writing nothing; rank 0 takes the lock, writes and evaluates."""
    previous = completed_run(cfg, run_dir)
    if previous is not None:
        return previous
    with preemption.handle_signals():
        return train(cfg, run_dir, Tracker.disabled(), group)


def lead(cfg: DictConfig, run_dir: Path, multirun: bool, run_name: str | None, group: Group) -> dict[str, Any]:
    """The run itself (rank 0 of a distributed one): the lock, the checks of a previous run, training, metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        previous = completed_run(cfg, run_dir)
        if previous is not None:
            return previous
        checkpoint = find_checkpoint(cfg.train.resume, run_dir)
        if checkpoint is not None:  # before the model loads: a checkpoint of other math is refused at once
            check_resumable(checkpoint, cfg)
        try:
            with preemption.handle_signals():
                return train_and_record(cfg, run_dir, multirun, run_name, group)
        except Preempted as stop:
            preemption.hand_on(stop.signum)  # under submitit: requeue the job (and exit)
            raise


def completed_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """With train.resume=auto, the metrics of a run that completed in `run_dir` with the same math and at least
    train.steps steps (it is skipped); a completed run of other math is refused. None: train."""
    done = run_dir / "metrics.json"
    if cfg.train.resume != "auto" or not done.is_file():
        return None
    try:
        previous = read_json(done)
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict) or previous.get("status") != "completed":
        return None
    saved = previous.get("config")
    check_same_math(saved if isinstance(saved, dict) else None, cfg, f"the completed run in {run_dir}")
    if isinstance(previous.get("steps"), int) and previous["steps"] < int(cfg.train.steps):
        log.info("%s completed %d steps: continuing to %d", run_dir, previous["steps"], cfg.train.steps)
        return None
    log.info("%s already completed: skipped (train.resume=null starts over)", run_dir)
    return previous


def train_and_record(
    cfg: DictConfig, run_dir: Path, multirun: bool, run_name: str | None, group: Group | None = None
) -> dict[str, Any]:
    """run()'s work inside the lock and the signal handlers: train, evaluate, write metrics.json."""
    tracker = Tracker(cfg, run_dir, job_type="train", name=run_name)
    started = time.perf_counter()
    identity = {"config": run_config(cfg), "zoodip_version": __version__}
    try:
        if cfg.eval.enabled:  # fail before training when the evaluation could not run (e.g. missing CLIP)
            preflight(cfg)
        metrics = train(cfg, run_dir, tracker, group)
    except Preempted as stop:
        metrics = {
            "status": "preempted",
            "error": None,
            "signal": preemption.signal_name(stop.signum),
            "checkpoint_step": stop.step,
            "wall_seconds": time.perf_counter() - started,
            "wandb": tracker.info,
            **identity,
        }
        write_json(run_dir / "metrics.json", metrics)
        tracker.preempted()
        tracker.finish(exit_code=EXIT_PREEMPTED)
        print(
            f"zoodip: {stop}; the same command continues it (train.resume=auto); outputs in {run_dir}",
            file=sys.stderr,
            flush=True,
        )
        raise
    except (ZoodipError, Exception, KeyboardInterrupt) as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        reason = str(err) or type(err).__name__
        metrics = {
            "status": status,
            "error": f"{type(err).__name__}: {reason}",
            "wall_seconds": time.perf_counter() - started,
            "wandb": tracker.info,
            **identity,
        }
        write_json(run_dir / "metrics.json", metrics)
        tracker.finish(exit_code=1)
        if isinstance(err, ZoodipError | KeyboardInterrupt) or not multirun:
            raise
        log.error("job failed, the sweep carries on: %s", metrics["error"])
        return metrics
    metrics.update(wandb=tracker.info, **identity)
    write_json(run_dir / "metrics.json", metrics)
    tracker.summary(metrics)
    if cfg.eval.enabled:  # after train() returned, so its model is freed before evaluation loads its own
        try:
            eval_metrics = evaluate_run(run_dir, cfg=cfg, tracker=tracker)
            metrics["eval"] = {k: v for k, v in eval_metrics.items() if k in SUMMARY_KEYS and k != "images_per_second"}
        except Exception as err:  # training itself completed: keep its status, record why eval did not
            log.error("evaluation failed: %s", err)
            metrics["eval_error"] = f"{type(err).__name__}: {err}"
        write_json(run_dir / "metrics.json", metrics)
    tracker.artifact(run_dir / "learned_embeds.safetensors", f"learned_embeds-{run_dir.name}", "embedding")
    tracker.finish(exit_code=0)
    summary = f"final_loss={number(metrics['final_loss'], '.5g')}, {number(metrics['iters_per_second'], '.2f')} it/s"
    if "loss_ratio" in metrics:  # None when the initial loss is 0 (data.planted_scale=0)
        summary += (
            f", planted loss_ratio={number(metrics['loss_ratio'], '.3f')}, "
            f"planted_cosine={number(metrics['planted_cosine'], '.3f')}"
        )
    print(f"zoodip: completed {metrics['steps']} steps ({summary}); outputs in {run_dir}", file=sys.stderr)
    return metrics


def number(value: float | None, spec: str) -> str:
    """`value` formatted for the closing line, or n/a when there is none."""
    return "n/a" if value is None else format(value, spec)


def check_objective(cfg: DictConfig) -> None:
    """optimized_metric and tuning_subjects: what a job returns to a sweeper (hparams_search/)."""
    metric = cfg.get("optimized_metric")
    if metric is not None and (not isinstance(metric, str) or not metric.strip("/.")):
        raise ZoodipError(f"optimized_metric must be a metrics.json key (eval/subject_accuracy) or null: {metric!r}")
    if isinstance(metric, str) and metric.startswith(("eval/", "eval.")) and not cfg.eval.enabled:
        raise ZoodipError(
            f"optimized_metric={metric} is an evaluation score but eval.enabled=false: turn the evaluation on, or "
            f"optimize a training metric (final_loss; planted_cosine or loss_ratio with data=planted)"
        )
    subjects = cfg.get("tuning_subjects")
    if subjects is not None and (
        not isinstance(subjects, ListConfig)
        or not subjects
        or not all(isinstance(x, str) and x for x in subjects)
        or len(set(subjects)) != len(subjects)
    ):
        shown = OmegaConf.to_container(subjects) if isinstance(subjects, ListConfig) else subjects
        raise ZoodipError(f"tuning_subjects must be a list of distinct data.subject names or null, got {shown!r}")


def objective_value(metrics: dict[str, Any], metric: str | None) -> float | None:
    """The number a job returns to a sweeper: metrics.json's `metric` (eval/subject_accuracy reads its "eval" entry),
    final_loss when `metric` is null. None when the run did not produce a finite one (it failed, or it has no such
    metric): Optuna records a failed trial and the study carries on."""
    if metric is None:
        return metrics.get("final_loss")
    if metrics.get("status") != "completed":
        return None
    node: Any = metrics
    for part in re.split(r"[/.]", metric.strip("/.")):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        log.warning("optimized_metric=%s: the run has no finite value for it (%r); the job returns none", metric, node)
        return None
    return float(node)


def run_job(cfg: DictConfig, output_dir: Path, multirun: bool, name: str | None) -> float | None:
    """One Hydra job: a run in `output_dir`, or with tuning_subjects one run per subject in <output_dir>/<subject>
    (each a complete run folder: resumable, zoodip-eval can score it). Returns the objective (optimized_metric), for
    several subjects their mean, written with each subject's value to <output_dir>/objective.json."""
    check_objective(cfg)
    metric = cfg.get("optimized_metric")
    subjects = cfg.get("tuning_subjects")
    if not subjects:
        return objective_value(run(cfg, output_dir, multirun=multirun, run_name=name), metric)
    values: dict[str, float | None] = {}
    for subject in subjects:
        sub = copy.deepcopy(cfg)
        sub.data.subject = subject
        run_dir = output_dir / subject
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / ".hydra" / "config.yaml", lambda tmp, sub=sub: OmegaConf.save(sub, tmp))
        metrics = run(sub, run_dir, multirun=multirun, run_name=f"{name}-{subject}" if name else subject)
        values[subject] = objective_value(metrics, metric if metric is not None else "final_loss")
        if values[subject] is None:  # the mean is undefined: spend no more time on this job
            break
    mean = None if None in values.values() else sum(values.values()) / len(values)  # type: ignore[arg-type]
    record = {"optimized_metric": metric or "final_loss", "value": mean, "by_subject": values}
    write_json(output_dir / "objective.json", record)
    return mean


def train_task(cfg: DictConfig) -> float | None:
    """zoodip-train's task: one run (or one sweep job) in Hydra's output folder; returns the sweeper's objective."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    name = (hc.job.override_dirname or f"job{hc.job.num}") if multirun else None
    return run_job(cfg, Path(hc.runtime.output_dir), multirun, name)


main = hydra_app("train", train_task, failure="training failed")


if __name__ == "__main__":
    main()
