"""The method registry (zoodip/method/methods.py), GF-TI, the official-code optimizer, INT4 only on the UNet, SNR
sampling, caption files and flips: each against a hand computation or an end-to-end tiny run."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from PIL import Image

import zoodip.runtime.train as train_mod
from zoodip.data.dataset import Reference, read_caption_files
from zoodip.errors import ZoodipError
from zoodip.method.estimators import direction, direction_seeds
from zoodip.method.methods import CMAES, METHODS, GradientMethod, gfti_scale, pca_basis
from zoodip.method.timesteps import TimestepSampler, snr_weights
from zoodip.models.loading import load_components
from zoodip.runtime.train import run
from zoodip.schema import check_config, method_settings


def test_every_estimator_config_is_a_registry_entry():
    from zoodip import CONF_DIR

    names = {p.stem for p in (CONF_DIR / "estimator").glob("*.yaml")}
    assert names | {"gfti"} == set(METHODS)
    assert [m for m, spec in METHODS.items() if spec.autograd] == ["backprop"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), 3),
        (("estimator=spsa",), 4),
        (("estimator=one_point",), 3),
        (("estimator=antithetic",), 3),
        (("estimator=guided", "estimator.k=2"), 3),
        (("estimator=hizoo",), 3),
        (("estimator=prgf",), 3),
        (("estimator=hizoo", "estimator.n=2"), 5),
        (("experiments=ti", "model=tiny"), 1),
        (("method=gfti", "method.population=5", "train.checkpoint_every=0"), 5),
    ],
)
def test_forward_passes_per_step_are_the_registrys(tmp_path, overrides, expected):
    cfg = compose_train("data=planted", "train.steps=2", "eval.enabled=false", *overrides)
    metrics = run(cfg, tmp_path)
    assert metrics["forward_passes"] == 2 * expected == 2 * METHODS[metrics["method"]].passes(method_settings(cfg))


def test_gfti_runs_forward_only_on_the_quantized_model(tmp_path):
    """GF-TI's check, with population 6: forward_passes = population x steps, the token moves, INT8 weights."""
    cfg = compose_train(
        "data=planted",
        "method=gfti",
        "method.population=6",
        "train.steps=20",
        "train.checkpoint_every=0",
        "eval.enabled=false",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["forward_passes"] == 6 * 20
    assert metrics["weights_by_component"]["unet"] == "int8"
    history = train_mod.pd.read_csv(tmp_path / "history.csv")
    assert {"population_loss_min", "population_loss_std", "cma_sigma"} <= set(history.columns)
    assert history.token_norm.iloc[-1] != pytest.approx(history.token_norm.iloc[0], rel=1e-6)


@pytest.mark.slow  # about 35 s; the stateful estimators' and the signal tests cover resuming in make test
def test_gfti_preempted_then_resumed_equals_a_straight_run(tmp_path, monkeypatch):
    """GF-TI checkpoints CMA-ES's whole state (tensors and JSON, no pickle) with the defaults: SIGTERM inside step 3
    of 6, then the same command (train.resume=auto) ends bit-identical to an uninterrupted run, CMA-ES's own
    state included; and a checkpoint every 2 steps needs no override."""
    import os
    import signal

    from safetensors.torch import load_file

    from zoodip.runtime.checkpoint import load_checkpoint
    from zoodip.runtime.preemption import Preempted

    common = [
        "data=planted",
        "data.eval_points=2",
        "method=gfti",
        "method.population=6",
        "method.intrinsic_dim=16",
        "train.steps=6",
        "eval.enabled=false",
    ]
    assert check_config(compose_train(*common)) is None  # the default train.checkpoint_every is allowed
    straight = run(compose_train(*common), tmp_path / "straight")
    real, calls = CMAES.step, []

    def step_then_sigterm(self, loss_fn, step):
        calls.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, loss_fn, step)

    monkeypatch.setattr(CMAES, "step", step_then_sigterm)
    with pytest.raises(Preempted):
        run(compose_train(*common, "train.checkpoint_every=2"), tmp_path / "resumed")
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.json")
    assert calls == [1, 2, 3] and state.step == 3 and state.cma["es"]["attrs"]["countiter"] == 3
    record = (tmp_path / "resumed" / "checkpoints" / "last.json").read_text()
    assert '"C"' in record and '"pc"' in record and '"rng"' in record
    resumed = run(compose_train(*common, "train.checkpoint_every=2"), tmp_path / "resumed")
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 3
    assert resumed["final_loss"] == straight["final_loss"]
    a, b = (load_file(tmp_path / d / "learned_embeds.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pca_basis_spans_the_tables_main_directions():
    """A table that varies along e0 (most) and e1 only: the top-2 basis is {e0, e1}, orthonormal rows."""
    g = torch.Generator().manual_seed(0)
    table = torch.zeros(200, 6)
    table[:, 0] = 5 * torch.randn(200, generator=g)
    table[:, 1] = torch.randn(200, generator=g)
    basis = pca_basis([table], num_vectors=1, intrinsic_dim=2)
    assert basis.shape == (2, 6)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis[:, 2:], torch.zeros(2, 4), atol=1e-5, rtol=0)  # inside span{e0, e1}
    assert abs(float(basis[0, 0])) > 0.99  # the first row is the larger variance's direction
    two = pca_basis([table, table[:, :4]], num_vectors=2, intrinsic_dim=2)  # SDXL-like: blocks per encoder row
    assert two.shape == (8, 2 * 6 + 2 * 4)


def test_gfti_scale_matches_gfti_random_projection_spread():
    """alpha * std_hat * sqrt(d / d_i) / sigma: by hand for a table of std 2, d = 8, d_i = 2."""
    table = torch.tensor([[-2.0, 2.0] * 4] * 10)
    std_hat = float(table.flatten().std())
    assert gfti_scale([table], 2, alpha=1.0, sigma=0.5) == pytest.approx(std_hat * math.sqrt(8 / 2) / 0.5)


def test_cmaes_minimizes_a_quadratic_in_its_subspace():
    """CMA-ES (the cma package) drives theta to a target inside the PCA subspace: loss falls 100-fold."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(300, 8, generator=g)
    cfg = compose_train("method=gfti", "method.population=10", "method.intrinsic_dim=8")
    theta = torch.nn.Parameter(torch.zeros(8))
    es = CMAES(method_settings(cfg), theta, [table], 1)
    target = torch.linspace(-1, 1, 8)

    def loss_fn(thetas):
        return ((thetas - target) ** 2).sum(dim=1)

    first = float(loss_fn(theta.detach()[None]))
    for step in range(1, 81):
        es.step(loss_fn, step)
    assert float(loss_fn(theta.detach()[None])) < first / 100


def test_per_candidate_losses_give_each_candidate_its_own_sample(tmp_path):
    """shared_sample=false (GF-TI's own code): the same token scored twice gets two losses; shared: one."""
    parts = load_components("tiny", "random", None, torch.float32, torch.device("cpu"), "int8", seed=0)
    text = train_mod.TextConditioner(parts, "<p>", "dog", 1)
    objective = train_mod.Objective(parts, text)
    data = Reference(torch.randn(3, 4, 8, 8), torch.ones(3, 4, 8, 8), [["a photo of {}"]] * 3)
    theta = text.initial_theta()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        separate = train_mod.per_candidate_losses(objective, data, g, 500)(torch.stack([theta, theta]))
        z0, prompt = data.sample(g)
        objective.set_sample(z0, torch.randn(z0.shape), 500, prompt)
        shared = objective.losses(torch.stack([theta, theta]))
    assert separate[0] != separate[1] and shared[0] == shared[1]
    assert objective.forward_passes == 4


def official_adam_update(theta, m, v, grad, step, lr, eps, b1=0.9, b2=0.999):
    """The official script's hand-written Adam, re-implemented from official-code-notes.md on fp32 numbers."""
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
    return theta - lr * m_hat / (v_hat.sqrt() + eps), m, v


def test_zo_adam_official_equals_the_official_step():
    """optimizer=zo_adam_official: sum_i (dL_i / mu) e_i / (sqrt((d_eff + n - 1) / n) n), then Adam(lr 1e-2,
    eps 1e-3), over 7 steps, SG refreshing at steps 3 and 6 (so d_eff changes), against the hand version."""
    cfg = compose_train("optimizer=zo_adam_official", "sg.tau=3", "sg.nu=0.3", "estimator.mu=1e-2")
    dim, n, mu = 12, 2, 1e-2
    theta = torch.nn.Parameter(torch.linspace(-1, 1, dim))
    method = GradientMethod(method_settings(cfg), theta)
    target = torch.arange(dim, dtype=torch.float32) / dim

    def loss_fn(thetas):
        return ((thetas - target) ** 2).sum(dim=1)

    hand, m, v, removed = theta.detach().clone(), torch.zeros(dim), torch.zeros(dim), 0
    projector = torch.zeros(0, dim)
    for step in range(1, 8):
        seeds = direction_seeds(int(cfg.train.seed), step, n + 1)
        base = float(loss_fn(hand[None]))
        total = torch.zeros(dim)
        for s in seeds[:n]:
            e = direction(s, dim)
            total += (float(loss_fn((hand + mu * e)[None])) - base) / mu * e
        grad = total / (math.sqrt((dim - removed + n - 1) / n) * n)
        grad = grad - (grad @ projector.T) @ projector
        hand, m, v = official_adam_update(hand, m, v, grad, step, lr=1e-2, eps=1e-3)
        method.step(loss_fn, step)
        torch.testing.assert_close(theta.detach(), hand, atol=1e-6, rtol=1e-5)
        projector, removed = method.sg.projector.clone(), method.sg.projector.shape[0]
    assert cfg.optimizer.lr == 1e-2 and cfg.optimizer.eps == 1e-3 and removed > 0


def test_int4_quantizes_only_the_unet(tmp_path):
    """Paper S3.2 / Table S8: INT4 U-Net, INT8 VAE and text encoder; metrics.json says so per component."""
    cfg = compose_train("quantization=int4", "data=planted", "train.steps=1", "eval.enabled=false")
    assert run(cfg, tmp_path)["weights_by_component"] == {"unet": "int4", "vae": "int8", "text_encoder": "int8"}


def test_snr_sampling_mean_is_textboosts_within_three_standard_errors():
    """400 draws of puts=snr on SD's schedule: mean t within 3 standard errors of TextBoost's sum t p(t)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    p = snr_weights(abar)
    t = torch.arange(1000, dtype=torch.float64)
    mean, sd = float((p * t).sum()), float((p * (t - (p * t).sum()) ** 2).sum().sqrt())
    g = torch.Generator().manual_seed(0)
    sampler = TimestepSampler("snr", 0, 1000, abar)
    draws = torch.tensor([sampler(g) for _ in range(400)], dtype=torch.float64)
    assert abs(float(draws.mean()) - mean) < 3 * sd / math.sqrt(400)
    assert mean == pytest.approx(584.3, abs=0.5)


def test_caption_files_beside_the_images(tmp_path):
    for i, text in enumerate(["a photo of <dog6> on grass\n", "{} on a sofa", "a <dog6> with a {{hat}}"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:02d}.jpg")
        (tmp_path / f"{i:02d}.txt").write_text(text)
    names = ["00.jpg", "01.jpg", "02.jpg"]
    captions = read_caption_files(tmp_path, names, "<dog6>")
    assert captions[0].format("<x>") == "a photo of <x> on grass" and captions[1] == "{} on a sofa"
    assert captions[2].format("<x>") == "a <x> with a {{hat}}"
    (tmp_path / "02.txt").unlink()
    with pytest.raises(ZoodipError, match="02.jpg in data.path has no caption file 02.txt"):
        read_caption_files(tmp_path, names, "<dog6>")
    (tmp_path / "02.txt").write_text("no slot here")
    with pytest.raises(ZoodipError, match="02.txt"):
        read_caption_files(tmp_path, names, "<dog6>")
    assert read_caption_files(tmp_path / "none", [], "<dog6>") is None


def test_templates_instead_of_captions_warn(tmp_path, subject_dir, caplog):
    cfg = compose_train(f"data.path={subject_dir}", "data.subject=dog6", "train.steps=1", "eval.enabled=false")
    with caplog.at_level(logging.WARNING, logger="zoodip.runtime.train"):
        run(cfg, tmp_path)
    assert sum("comprehensive captions" in r.message for r in caplog.records) == 1


def test_flip_draws_the_mirrored_latents_and_flip_p_0_keeps_the_old_stream():
    mean, flipped = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    plain = Reference(mean, torch.zeros_like(mean), [["{}"]] * 2)
    never = Reference(mean, torch.zeros_like(mean), [["{}"]] * 2, (flipped, torch.zeros_like(mean)), 0.0)
    always = Reference(mean, torch.zeros_like(mean), [["{}"]] * 2, (flipped, torch.zeros_like(mean)), 1.0)
    g1, g2, g3 = (torch.Generator().manual_seed(0) for _ in range(3))
    for _ in range(5):
        z_plain, z_never, z_always = plain.sample(g1)[0], never.sample(g2)[0], always.sample(g3)[0]
        assert torch.equal(z_plain, z_never)
        assert any(torch.equal(z_always, flipped[i : i + 1]) for i in range(2))


def test_bench_times_zoodip_trains_step(monkeypatch):
    """zoodip-bench calls train.training_step, with the model's own mu, lr and PUTS range."""
    from zoodip.tools import bench

    calls = []
    real = train_mod.training_step
    monkeypatch.setattr(train_mod, "training_step", lambda *a, **k: calls.append(a[-2]) or real(*a, **k))
    spec = {
        "arch": "tiny",
        "device": "cpu",
        "steps": 2,
        "warmup": 1,
        "resolution": 64,
        "seed": 0,
        "cpu_memory": "fast",
        "run_steps": 10,
    }
    result = bench.measure("zoodip", spec)
    assert calls == [1, 2, 3] and result["forward_passes_per_iter"] == 3
    assert result["hyperparameters"] == {"mu": 1e-3, "lr": 5e-3, "optimizer": "adam", "puts": "puts"}
    ti = bench.measure("ti", spec)
    assert ti["hyperparameters"]["optimizer"] == "adamw" and ti["forward_passes_per_iter"] == 1


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        (
            "zoodip_sd15",
            {
                "model.arch": "sd15",
                "quantization.weights": "int8",
                "method.name": "rge",
                "estimator.mu": 1e-3,
                "optimizer.lr": 5e-3,
                "sg.tau": 128,
                "sg.nu": 1e-3,
                "puts.t_low": 500,
                "puts.t_high": 900,
                "train.steps": 30000,
            },
        ),
        ("zoodip_sd21", {"model.arch": "sd21", "estimator.mu": 1e-2, "optimizer.lr": 1e-2, "train.steps": 30000}),
        ("zoodip_sdxl", {"model.arch": "sdxl", "estimator.mu": 1e-2, "puts.t_low": 700, "train.steps": 20000}),
        (
            "zoodip_int4",
            {
                "quantization.weights": "int4",
                "quantization.others": "int8",
                "estimator.mu": 1e-2,
                "model.dtype": "bf16",
            },
        ),
        (
            "ti_sd15",
            {
                "model.arch": "sd15",
                "method.name": "backprop",
                "quantization.weights": "none",
                "optimizer.name": "adamw",
                "optimizer.weight_decay": 1e-2,
                "optimizer.lr": 5e-3,
                "train.steps": 5000,
                "puts.kind": "uniform",
            },
        ),
        ("ti_sd21", {"model.arch": "sd21", "optimizer.lr": 5e-3, "train.steps": 5000}),
        ("ti_sdxl", {"model.arch": "sdxl", "train.steps": 5000, "method.name": "backprop"}),
        (
            "gfti_sd15",
            {
                "model.arch": "sd15",
                "method.name": "gfti",
                "method.intrinsic_dim": 256,
                "method.sigma": 1.0,
                "method.alpha": 1.0,
                "method.population": 30,
                "train.steps": 13000,
                "puts.kind": "uniform",
                "quantization.weights": "int8",
            },
        ),
    ],
)
def test_paper_presets_hold_the_papers_hyperparameters(preset, expected):
    from omegaconf import OmegaConf

    from zoodip import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiments={preset}"])
    assert {k: OmegaConf.select(cfg, k) for k in expected} == expected
    check_config(cfg)


@pytest.mark.parametrize(
    "estimator",
    [
        ("estimator=guided", "estimator.k=3"),
        # the same checkpoint path (Estimator.state / load_state); their state itself is tested in-process
        pytest.param(("estimator=hizoo",), marks=pytest.mark.slow),
        pytest.param(("estimator=prgf",), marks=pytest.mark.slow),
    ],
)
def test_stateful_estimators_resume_bit_identical(tmp_path, estimator):
    """guided and prgf keep their recent updates, hizoo its diag(H), in the checkpoint: 6 steps then raised to 9
    equals 9 straight."""
    from safetensors.torch import load_file

    common = ["data=planted", *estimator, "train.checkpoint_every=3", "eval.enabled=false"]
    run(compose_train(*common, "train.steps=9"), tmp_path / "straight")
    run(compose_train(*common, "train.steps=6"), tmp_path / "resumed")
    run(compose_train(*common, "train.steps=9"), tmp_path / "resumed")
    a, b = (load_file(tmp_path / d / "learned_embeds.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", ["puts.t_low=0.5", "puts.t_low=true"])
def test_validate_alone_types_puts_before_comparing(bad):
    """check_config() is what bench and library callers use: a float or bool T_L is one sentence, not a TypeError."""
    with pytest.raises(ZoodipError, match="puts.t_low must be an integer"):
        check_config(compose_train(bad))


def test_learning_rate_schedules_by_hand():
    """constant: lr at every step; cosine: lr (1 + cos(pi (step - 1) / steps)) / 2, by hand for 4 steps."""
    from zoodip.method.methods import learning_rate

    assert [learning_rate(0.1, "constant", s, 4) for s in (1, 4)] == [0.1, 0.1]
    # steps 1..4 of 4: cos(0) = 1, cos(pi/4) = 0.7071, cos(pi/2) = 0, cos(3 pi/4) = -0.7071
    expected = [0.1, 0.1 * 1.7071067811865475 / 2, 0.05, 0.1 * 0.2928932188134524 / 2]
    assert [learning_rate(0.1, "cosine", s, 4) for s in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_is_what_the_optimizer_used(tmp_path):
    """The lr column of history.csv is the lr Adam applied at that step: the cosine curve over train.steps, which
    train.forward_budget sets (here 12 // 3 = 4 steps)."""
    import pandas as pd

    from zoodip.method.methods import learning_rate

    run(
        compose_train(
            "data=planted",
            "optimizer.schedule=cosine",
            "train.forward_budget=12",
            "train.log_every=1",
            "optimizer.lr=0.1",
            "eval.enabled=false",
        ),
        tmp_path,
    )
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["lr"].tolist() == pytest.approx([learning_rate(0.1, "cosine", s, 4) for s in (1, 2, 3, 4)])


def test_cosine_schedule_resumes_bit_identical(tmp_path, monkeypatch):
    """A run stopped after step 5 of 9 (a preemption request) and resumed ends on the token of 9 straight steps: the
    cosine schedule is a function of the step and train.steps, which the resumed run has again."""
    from safetensors.torch import load_file

    import zoodip.runtime.preemption
    from zoodip.method.methods import GradientMethod
    from zoodip.runtime.preemption import Preempted

    common = ["data=planted", "optimizer.schedule=cosine", "train.steps=9", "eval.enabled=false"]
    run(compose_train(*common), tmp_path / "straight")
    real_step, stop_after = GradientMethod.step, {"step": 0}

    def step(self, loss_fn, k):
        stop_after["step"] = k
        return real_step(self, loss_fn, k)

    monkeypatch.setattr(GradientMethod, "step", step)
    monkeypatch.setattr(zoodip.runtime.preemption, "requested", lambda: 15 if stop_after["step"] == 5 else None)
    with pytest.raises(Preempted):
        run(compose_train(*common), tmp_path / "resumed")
    monkeypatch.undo()
    assert run(compose_train(*common), tmp_path / "resumed")["resumed_from_step"] == 5
    a, b = (load_file(tmp_path / d / "learned_embeds.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("optimizer.schedule=linear",), "optimizer.schedule must be one of constant, cosine, got 'linear'"),
        (("method=gfti", "optimizer.schedule=cosine"), "method=gfti \\(CMA-ES\\) has none"),
    ],
)
def test_bad_schedule_is_one_sentence(overrides, message):
    with pytest.raises(ZoodipError, match=message):
        check_config(compose_train(*overrides))


def test_prgf_prior_is_the_previous_estimate_and_guided_basis_the_updates():
    """History-PRGF: after a step the prior is that step's raw estimate (not the update Adam applied), and it is the
    checkpoint's estimator state; guided keeps the last k unit updates of theta."""
    target = torch.linspace(-1, 1, 12)

    def loss_fn(thetas, groups=None):
        return ((thetas - target) ** 2).sum(dim=1)

    for name in ("prgf", "guided"):
        cfg = compose_train(f"estimator={name}", "estimator.mu=1e-2", *(["estimator.k=2"] if name == "guided" else []))
        theta = torch.nn.Parameter(torch.zeros(12))
        method = GradientMethod(method_settings(cfg), theta)
        for step in (1, 2, 3):
            before = theta.detach().clone()
            result = method.step(loss_fn, step)
            update = theta.detach() - before
        if name == "prgf":
            assert torch.equal(method.estimator.prior, result.estimate) and not torch.allclose(
                method.estimator.prior, update
            )
            assert [torch.equal(t, result.estimate) for t in method.state_dict()["estimator"]] == [True]
        else:
            assert len(method.estimator.recent) == 2
            torch.testing.assert_close(method.estimator.recent[-1], update / update.norm())
