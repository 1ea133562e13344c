"""zoodip-train: personalize a (quantized) diffusion model with zeroth-order textual inversion (Algorithm 1)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from safetensors.torch import save_file
from tqdm import tqdm

from zoodip import CONF_DIR
from zoodip.checkpoint import TrainState, load_checkpoint, locate_checkpoint, save_checkpoint
from zoodip.data import (
    TEMPLATES,
    Reference,
    default_initializer,
    encode_latents,
    load_captions,
    read_reference_images,
)
from zoodip.errors import EXIT_USAGE, ZoodipError
from zoodip.estimators import ESTIMATORS, estimate
from zoodip.evaluate import SUMMARY_KEYS, Validator, evaluate_run, image_grid, preflight
from zoodip.io import atomic_write, read_json, write_json
from zoodip.models import (
    check_cpu_memory,
    load_components,
    peak_rss_bytes,
    resolve_device,
    resolve_dtype,
    set_cpu_memory,
)
from zoodip.objective import Objective, TextConditioner, check_compile
from zoodip.planted import PlantedTask
from zoodip.quantize import QUANTIZATIONS, forward_mode, quantized_fraction
from zoodip.subspace import SubspaceGradient
from zoodip.timesteps import SAMPLERS, TimestepSampler
from zoodip.tracking import Tracker

log = logging.getLogger("zoodip.train")


def validate(cfg: DictConfig) -> None:
    """Reject bad settings before anything heavy is loaded: one sentence naming the key and the fix."""
    est, sg, puts, opt = cfg.estimator, cfg.sg, cfg.puts, cfg.optimizer
    checks = [
        (est.name in ESTIMATORS, f"estimator must be one of {', '.join(ESTIMATORS)}, got {est.name!r}"),
        (isinstance(est.n, int) and est.n >= 1, f"estimator.n must be an integer >= 1, got {est.n!r}"),
        (float(est.mu) > 0, f"estimator.mu must be > 0, got {est.mu!r}"),
        (isinstance(sg.tau, int) and sg.tau >= 2, f"sg.tau must be an integer >= 2, got {sg.tau!r}"),
        (0 < float(sg.nu) < 1, f"sg.nu must be in (0, 1), got {sg.nu!r}"),
        (puts.kind in SAMPLERS, f"puts must be one of {', '.join(SAMPLERS)}, got {puts.kind!r}"),
        (opt.name in ("adam", "sgd"), f"optimizer.name must be adam or sgd, got {opt.name!r}"),
        (float(opt.lr) > 0, f"optimizer.lr must be > 0, got {opt.lr!r}"),
        (
            isinstance(cfg.train.steps, int) and cfg.train.steps >= 1,
            f"train.steps must be >= 1, got {cfg.train.steps!r}",
        ),
        (cfg.quantization.weights in QUANTIZATIONS, f"quantization must be one of {', '.join(QUANTIZATIONS)}"),
        (cfg.data.kind in ("dreambooth", "planted"), f"data must be dreambooth or planted, got {cfg.data.kind!r}"),
        (
            cfg.data.template in TEMPLATES,
            f"data.template must be one of {', '.join(TEMPLATES)}, got {cfg.data.template!r}",
        ),
        (
            est.name != "backprop" or cfg.quantization.weights == "none",
            "estimator=backprop is the first-order TI baseline through an unquantized model: "
            "add quantization=none (or use experiments=ti)",
        ),
    ]
    if puts.kind == "puts":
        low, high = puts.t_low, puts.t_high
        checks.append((isinstance(low, int) and isinstance(high, int), "puts.t_low and puts.t_high must be integers"))
        checks.append((0 <= low < high, f"puts.t_low must satisfy 0 <= t_low < t_high, got t_low={low}, t_high={high}"))
    for ok, message in checks:
        if not ok:
            raise ZoodipError(message)
    check_cpu_memory(cfg.train.cpu_memory)
    check_compile(cfg.train.compile, cfg.quantization.weights)


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


def make_optimizer(cfg: DictConfig, theta: torch.nn.Parameter) -> torch.optim.Optimizer:
    """ZO-Adam / ZO-SGD: torch's own optimizers fed the estimated gradient through `.grad`."""
    o = cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(
            [theta], lr=float(o.lr), betas=tuple(o.betas), eps=float(o.eps), weight_decay=float(o.weight_decay)
        )
    return torch.optim.SGD([theta], lr=float(o.lr), momentum=float(o.momentum), weight_decay=float(o.weight_decay))


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


def train(cfg: DictConfig, run_dir: Path, tracker: Tracker) -> dict[str, Any]:
    """Algorithm 1 of the paper, with resumable state. Returns the metrics written to metrics.json."""
    validate(cfg)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    quant = cfg.quantization.weights
    if device.type == "cpu":
        set_cpu_memory(cfg.train.cpu_memory)
    data_cfg = cfg.data
    if data_cfg.kind == "dreambooth":  # read the images before loading a multi-GB model
        refs = read_reference_images(data_cfg.path, int(data_cfg.resolution))  # oriented, cropped, resized
        sheet = image_grid(refs.images, cols=min(5, len(refs.images)))  # exactly what the model is trained on
        atomic_write(run_dir / "references.png", lambda tmp: sheet.save(tmp, format="PNG"))
        images, names = refs.tensor(), refs.names
        captions = load_captions(data_cfg.captions, data_cfg.subject, names, refs.entries)
    initializer = data_cfg.initializer_token or default_initializer(data_cfg.subject)

    log.info("loading %s (%s, %s weights, %s activations) on %s", cfg.model.arch, cfg.model.init, quant, dtype, device)
    parts = load_components(
        cfg.model.arch, cfg.model.init, cfg.model.path, dtype, device, quant, seed=int(cfg.model.seed)
    )
    num_t = parts.scheduler.config.num_train_timesteps
    if cfg.puts.kind == "puts" and cfg.puts.t_high > num_t:
        raise ZoodipError(f"puts.t_high={cfg.puts.t_high} is beyond the model's {num_t} training timesteps")
    frac = quantized_fraction(parts.text_encoders + [parts.unet] + ([parts.vae] if parts.vae is not None else []))

    text = TextConditioner(parts, data_cfg.placeholder_token, initializer, int(data_cfg.num_vectors))
    sampler = TimestepSampler(cfg.puts.kind, cfg.puts.t_low, cfg.puts.t_high, parts.scheduler.alphas_cumprod)
    theta0 = text.initial_theta()
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)  # the VAE's downsampling: 8 for every SD
    latent_shape = (
        parts.unet.config.in_channels,
        int(data_cfg.resolution) // factor,
        int(data_cfg.resolution) // factor,
    )

    planted = None
    if data_cfg.kind == "dreambooth":
        mean, std = encode_latents(parts.vae, images, device)
        templates = TEMPLATES[data_cfg.template]
        data = Reference(mean, std, [[c] for c in captions] if captions else [templates] * len(names))
    else:
        planted = PlantedTask(
            theta0,
            latent_shape,
            rank=int(data_cfg.planted_rank),
            scale=float(data_cfg.planted_scale),
            num_images=int(data_cfg.num_images),
            eval_points=int(data_cfg.eval_points),
            seed=int(data_cfg.seed),
            sample_timestep=sampler,
        )
        data = planted
    parts.release_vae()  # reference latents are encoded: training holds no VAE

    validator = Validator(cfg, parts, text) if int(cfg.eval.every) > 0 else None
    if cfg.train.compile and device.type == "cpu":
        log.warning("train.compile=%s on the CPU: measured slower than eager there (BENCHMARKS.md)", cfg.train.compile)
    objective = Objective(
        parts, text, bool(cfg.estimator.batched), int(cfg.estimator.max_batch), cfg.train.compile or None
    )
    theta = torch.nn.Parameter(theta0.clone())
    optimizer = make_optimizer(cfg, theta)
    sg = SubspaceGradient(int(cfg.sg.tau), float(cfg.sg.nu), theta.numel()) if cfg.sg.enabled else None
    generator = torch.Generator().manual_seed(int(cfg.train.seed))
    est_name = cfg.estimator.name
    zo_context = (lambda: torch.enable_grad()) if est_name == "backprop" else (lambda: forward_mode(quant))

    history: list[dict[str, Any]] = []
    start, nonfinite, wall_before, initial_eval = 0, 0, 0.0, None
    checkpoint = find_checkpoint(cfg.train.resume, run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        if state.theta.numel() != theta.numel():
            raise ZoodipError(
                f"checkpoint {checkpoint} holds a token of size {state.theta.numel()}, not {theta.numel()}"
            )
        with torch.no_grad():
            theta.copy_(state.theta)
        optimizer.load_state_dict(state.optimizer)
        if sg is not None and state.sg is not None:
            sg.load_state_dict(state.sg)
        generator.set_state(state.generator)
        history, start, nonfinite = state.history, state.step, state.nonfinite
        wall_before, initial_eval = state.wall_seconds, state.initial_eval_loss
        objective.forward_passes = state.forward_passes
        log.info("resumed from %s at step %d", checkpoint, start)
    if planted is not None and initial_eval is None:
        with forward_mode(quant):
            initial_eval = planted.eval_loss(objective, theta0)

    def write_checkpoint(step: int, wall: float) -> None:
        state = TrainState(
            step=step, theta=theta.detach(), optimizer=optimizer.state_dict(),
            sg=sg.state_dict() if sg is not None else None, generator=generator.get_state(),
            history=history, nonfinite=nonfinite, wall_seconds=wall, initial_eval_loss=initial_eval,
            forward_passes=objective.forward_passes,
        )  # fmt: skip
        save_checkpoint(run_dir / "checkpoints", state)

    steps = int(cfg.train.steps)
    t_start = time.perf_counter()
    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="zoodip", disable=not cfg.train.progress,
               dynamic_ncols=True, file=sys.stderr, mininterval=0.5)  # fmt: skip
    for step in bar:
        # One sample per step, shared by every evaluation of the step (common random numbers).
        z0, prompt = data.sample(generator)
        t = sampler(generator)
        noise = torch.randn(z0.shape, generator=generator)
        with zo_context():
            objective.set_sample(z0, noise, t, prompt)
            if planted is not None:  # a constant: no_grad, not inference_mode, since backprop's loss saves it
                with torch.no_grad():
                    planted.set_target(objective)
            est = estimate(est_name, objective.losses, theta.detach(), int(cfg.estimator.n), float(cfg.estimator.mu),
                           int(cfg.train.seed), step)  # fmt: skip
        grad = sg.project(est.grad) if sg is not None else est.grad
        finite = math.isfinite(est.loss) and bool(torch.isfinite(est.losses).all()) and bool(torch.isfinite(grad).all())
        if finite:
            theta.grad = grad.to(theta.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            nonfinite += 1
            if nonfinite > int(cfg.train.max_nonfinite):
                raise FloatingPointError(
                    f"{nonfinite} steps had a non-finite loss (train.max_nonfinite={cfg.train.max_nonfinite})"
                )
        istar = sg.observe(theta, step) if sg is not None else None

        row = {"step": step, "loss": est.loss if finite else float("nan"), "timestep": t,
               "grad_norm": float(est.grad.norm()), "projected_grad_norm": float(grad.norm()),
               "token_norm": float(theta.detach().norm()), "lr": optimizer.param_groups[0]["lr"],
               "peak_memory_bytes": peak_memory_bytes(device)}  # fmt: skip
        if istar is not None:
            row["sg_istar_over_tau"] = istar / sg.tau
        if step % int(cfg.train.log_every) == 0 or istar is not None or step == steps:
            history.append(row)
            tracker.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if validator is not None and step % int(cfg.eval.every) == 0:  # a few images and CLIP-I, to watch
            val = validator(theta.detach())
            tracker.log(val.metrics, step=step)
            tracker.log_images("val/images", val.images, val.captions, step=step)
        if cfg.train.progress:
            bar.set_postfix(loss=f"{row['loss']:.4g}", mem=f"{row['peak_memory_bytes'] / 2**30:.2f}G", refresh=False)
        elapsed = wall_before + time.perf_counter() - t_start
        if cfg.train.save_every and step % int(cfg.train.save_every) == 0:
            save_embeddings(run_dir, text, theta)
        if cfg.train.checkpoint_every and step % int(cfg.train.checkpoint_every) == 0:
            write_checkpoint(step, elapsed)
            write_history(run_dir, history)
    bar.close()
    session_seconds = time.perf_counter() - t_start
    wall = wall_before + session_seconds

    save_embeddings(run_dir, text, theta)
    write_history(run_dir, history)
    losses = [r["loss"] for r in history]
    ratios = [r["sg_istar_over_tau"] for r in history if "sg_istar_over_tau" in r]
    metrics: dict[str, Any] = {
        "status": "completed", "error": None, "steps": steps, "resumed_from_step": start or None,
        "initial_loss": window_mean(losses, first=True), "final_loss": window_mean(losses, first=False),
        "wall_seconds": wall, "iters_per_second": (steps - start) / session_seconds if session_seconds > 0 else None,
        "forward_passes": objective.forward_passes, "forward_passes_per_step": objective.forward_passes / max(1, steps),
        "peak_memory_bytes": peak_memory_bytes(device), "quantized_fraction": frac, "nonfinite_steps": nonfinite,
        "sg_istar_over_tau": ratios, "sg_istar_over_tau_mean": sum(ratios) / len(ratios) if ratios else None,
        "token_dim": theta.numel(), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "model_source": parts.source, "placeholder_token": text.placeholder, "initializer_token": initializer,
    }  # fmt: skip
    if planted is not None:
        with forward_mode(quant):
            final_eval = planted.eval_loss(objective, theta.detach())
        metrics.update(initial_eval_loss=initial_eval, final_eval_loss=final_eval,
                       loss_ratio=final_eval / initial_eval if initial_eval else None,
                       planted_cosine=planted.cosine(theta.detach()))  # fmt: skip
    return metrics


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(history)
    atomic_write(run_dir / "history.csv", lambda tmp: frame.to_csv(tmp, index=False))


def run(cfg: DictConfig, run_dir: Path, multirun: bool = False, run_name: str | None = None) -> dict[str, Any]:
    """Train, then write metrics.json whatever happened. Bad input raises ZoodipError (exit code 2)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "metrics.json"
    if cfg.train.resume == "auto" and done.is_file() and read_json(done).get("status") == "completed":
        log.info("%s already completed: skipped (train.resume=null starts over)", run_dir)
        return read_json(done)
    tracker = Tracker(cfg, run_dir, job_type="train", name=run_name)
    started = time.perf_counter()
    try:
        if cfg.eval.enabled:  # fail before training when the evaluation could not run (e.g. missing CLIP)
            preflight(cfg)
        metrics = train(cfg, run_dir, tracker)
    except (ZoodipError, Exception, KeyboardInterrupt) as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        reason = str(err) or type(err).__name__
        metrics = {"status": status, "error": f"{type(err).__name__}: {reason}",
                   "wall_seconds": time.perf_counter() - started, "wandb": tracker.info}  # fmt: skip
        write_json(run_dir / "metrics.json", metrics)
        tracker.finish(exit_code=1)
        if isinstance(err, ZoodipError | KeyboardInterrupt) or not multirun:
            raise
        log.error("job failed, the sweep carries on: %s", metrics["error"])
        return metrics
    metrics["wandb"] = tracker.info
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
    summary = f"final_loss={metrics['final_loss']:.5g}, {metrics['iters_per_second']:.2f} it/s"
    if "loss_ratio" in metrics:
        summary += f", planted loss_ratio={metrics['loss_ratio']:.3f}, planted_cosine={metrics['planted_cosine']:.3f}"
    print(f"zoodip: completed {metrics['steps']} steps ({summary}); outputs in {run_dir}", file=sys.stderr)
    return metrics


_TASK_STARTED = False


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    global _TASK_STARTED
    _TASK_STARTED = True
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        name = (hc.job.override_dirname or f"job{hc.job.num}") if multirun else None
        metrics = run(cfg, Path(hc.runtime.output_dir), multirun=multirun, run_name=name)
    except ZoodipError as err:
        if multirun:
            log.error("job rejected: %s", err)
            return None
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
    except Exception as err:
        print(f"error: training failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    return metrics.get("final_loss")


def main() -> None:
    """Console entry point. Hydra's own config errors (unknown option, bad override) also exit with code 2."""
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _TASK_STARTED:
            raise SystemExit(EXIT_USAGE) from None
        raise


if __name__ == "__main__":
    main()
