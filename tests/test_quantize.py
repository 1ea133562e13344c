"""Quantization: every Linear and Conv2d, nothing else, and the paper's 96.4% for SD1.5 (S1.3)."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tests.conftest import same_weights
from zoodip import CONF_DIR
from zoodip.errors import ZoodipError
from zoodip.models.loading import _safetensors_shards, build_unet, load_components, set_cpu_memory
from zoodip.models.quantize import (
    count_quantized,
    dequantized_copy_bytes,
    keep_dequantized_copies,
    quantize_weights,
    use_fast_cpu_int8,
)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads((CONF_DIR / "arch/tiny/unet/config.json").read_text()))


def test_int8_quantizes_exactly_the_linear_and_conv_weights():
    unet = tiny_unet()
    expected = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
    norms = {n: m.weight.detach().clone() for n, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    quantize_weights(unet, "int8")
    quantized, total = count_quantized(unet)
    assert quantized == expected and total == sum(p.numel() for p in unet.parameters())
    for name, module in unet.named_modules():
        if name in norms:  # normalization layers stay float and untouched
            assert torch.equal(module.weight, norms[name])


def test_int8_forward_stays_close_to_float():
    unet = tiny_unet()
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.inference_mode():
        ref = unet(x, t, c).sample
        quantize_weights(unet, "int8")
        out = unet(x, t, c).sample
    assert not torch.equal(out, ref)  # it really is quantized...
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # ...and still the same function


def _linear_conv_fraction(*modules) -> float:
    q = sum(
        m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    )
    return q / sum(p.numel() for mod in modules for p in mod.parameters())


def test_sd15_fraction_is_the_papers_96_4_percent():
    """Built on the meta device: the real SD1.5 architecture, no weights, no memory."""
    arch = CONF_DIR / "arch" / "sd15"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(arch / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_dict(json.loads((arch / "text_encoder/config.json").read_text())))
    fraction = _linear_conv_fraction(unet, vae, text)
    assert abs(fraction - 0.964) < 0.003, fraction


def test_fast_cpu_int8_computes_the_dequantized_layer_by_hand():
    """W = q * s per output channel (Eq. 2), then the float layer: checked against a hand dequantization."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(3, 8, 3, padding=1))
    quantize_weights(net, "int8")
    assert use_fast_cpu_int8(net) == 2 and use_fast_cpu_int8(net) == 0  # switched once only
    lin, conv = net[0], net[1]
    w_lin = lin.weight._data.float() * lin.weight._scale.float()
    w_conv = conv.weight._data.float() * conv.weight._scale.float()
    x, img = torch.randn(300, 16), torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, w_lin, lin.bias), atol=1e-5)
        assert torch.allclose(conv(img), torch.nn.functional.conv2d(img, w_conv, conv.bias, padding=1), atol=1e-5)
    bf16 = torch.nn.Sequential(torch.nn.Linear(16, 32)).bfloat16()
    quantize_weights(bf16, "int8")
    use_fast_cpu_int8(bf16)
    with torch.inference_mode():  # many rows: the dequantized GEMM; few rows: quanto's int8pack kernel
        for rows in (300, 7):  # either side of INT8PACK_MAX_ROWS
            xb = torch.randn(rows, 16).bfloat16()
            assert torch.allclose(bf16(xb).float(), bf16[0]._quanto_forward(xb).float(), atol=0.05)


def test_fast_cpu_int8_leaves_autograd_to_quanto():
    """With autograd on, the shared dequantization buffer would be saved for backward and then overwritten by
    the next layer: such forwards keep quanto's path, and the input gradient is right."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    quantize_weights(net, "int8")
    use_fast_cpu_int8(net)
    x = torch.randn(200, 8, requires_grad=True)
    net(x).sum().backward()
    w0 = net[0].weight._data.float() * net[0].weight._scale.float()
    w1 = net[1].weight._data.float() * net[1].weight._scale.float()
    assert torch.allclose(x.grad, (torch.ones(200, 4) @ w1 @ w0), atol=1e-4)


def test_fast_cpu_int8_leaves_compiled_graphs_to_quanto():
    """Under torch.compile the layer traces quanto's forward, not the dequantize-into-the-shared-buffer path
    (compiled, that path held a dequantized copy of every weight: SD1.5 peak 5.74 GB)."""
    traced: list[str] = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    quantize_weights(model, "int8")
    assert use_fast_cpu_int8(model) == 1
    x = torch.randn(40, 64)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, backend=backend)(x)
    assert not any("mul" in target for target in traced) and any("linear" in target for target in traced)
    torch.testing.assert_close(compiled, eager)


def test_a_kept_dequantized_copy_gives_the_same_bits_once():
    """keep_dequantized_copies: each layer dequantizes once (the same product as at every forward, so bit-identical
    outputs), and later forwards read the copy, not the int8 data."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(3, 8, 3, padding=1))
    quantize_weights(net, "int8")
    use_fast_cpu_int8(net)
    x, img = torch.randn(300, 16), torch.randn(2, 3, 5, 5)
    with torch.inference_mode():
        every_forward = net[0](x), net[1](img)
    assert dequantized_copy_bytes([net], torch.float32) == (16 * 32 + 3 * 8 * 9) * 4
    assert keep_dequantized_copies([net], torch.float32) == 2 and keep_dequantized_copies([net], torch.float32) == 0
    assert set(net[0]._dequantized_copies) == {torch.float32}
    w = net[0].weight._data.float() * net[0].weight._scale.float()
    assert torch.equal(net[0]._dequantized_copies[torch.float32], w)
    with torch.inference_mode():
        assert torch.equal(net[0](x), every_forward[0]) and torch.equal(net[1](img), every_forward[1])
        net[0].weight._data.zero_()  # the copy is what runs now: the int8 data is not read again
        assert torch.equal(net[0](x), every_forward[0])


@pytest.mark.parametrize("setting, kept", [(None, True), (True, True), (False, False)])
def test_loaded_models_keep_copies_when_they_are_small(tiny_pipeline_dir, setting, kept):
    """quantization.dequantized_copy: null keeps copies for a model as small as the tiny one; false never does; the
    training losses are the same bits either way."""
    parts = load_components(
        "tiny",
        "pretrained",
        str(tiny_pipeline_dir),
        torch.float32,
        torch.device("cpu"),
        "int8",
        dequantized_copy=setting,
    )
    layers = [m for m in parts.unet.modules() if hasattr(m, "_quanto_forward")]
    assert layers and all(hasattr(m, "_dequantized_copies") == kept for m in layers)


def test_dequantized_copies_change_no_loss(tiny_pipeline_dir):
    from zoodip.method.objective import Objective, TextConditioner

    losses = []
    for setting in (False, True):
        parts = load_components(
            "tiny",
            "pretrained",
            str(tiny_pipeline_dir),
            torch.float32,
            torch.device("cpu"),
            "int8",
            dequantized_copy=setting,
        )
        text = TextConditioner(parts, "<tok>", "dog", 1)
        objective = Objective(parts, text, batched=True)
        g = torch.Generator().manual_seed(0)
        theta = text.initial_theta()
        candidates = torch.stack([theta, theta + 0.01 * torch.randn(theta.shape, generator=g)])
        with torch.inference_mode():
            objective.set_sample(
                torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), 600, "a {}"
            )
            losses.append(objective.losses(candidates))
    assert torch.equal(losses[0], losses[1])


def test_int4_linear_projection_takes_the_permuted_feature_map():
    """SD2.1 and SDXL transformers project a permuted (strided) feature map with a Linear `proj_in`; quanto's
    packed-INT4 bf16 CPU matmul rejected it ("expect A to be contiguous"), failing zoodip_int4 on SDXL."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    block = Transformer2DModel(2, 128, in_channels=256, use_linear_projection=True, cross_attention_dim=64)
    block = block.to(torch.bfloat16).eval()
    x = torch.randn(1, 256, 4, 4, dtype=torch.bfloat16)
    context = torch.randn(1, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = block(x, context).sample.float()
        quantize_weights(block, "int4")
        out = block(x, context).sample.float()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert (out - reference).norm() < 0.2 * reference.norm()  # INT4 weights: close, not equal


def test_quantized_unet_streams_from_safetensors_like_from_pretrained(tiny_pipeline_dir):
    """Built block by block from the folder's safetensors: exactly the weights of from_pretrained + quantize."""
    folder = tiny_pipeline_dir / "unet"
    reference = UNet2DConditionModel.from_pretrained(folder)
    quantize_weights(reference, "int8")
    streamed = build_unet(
        UNet2DConditionModel.load_config(folder), torch.float32, "int8", weights=_safetensors_shards(folder)
    )
    ref_state, state = reference.state_dict(), streamed.state_dict()
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), key
    assert count_quantized(streamed) == count_quantized(reference)


def test_quantized_unet_rejects_weights_of_another_architecture(tiny_pipeline_dir):
    folder = tiny_pipeline_dir / "unet"
    weights = _safetensors_shards(folder)
    weights.pop(next(iter(weights)))
    config = UNet2DConditionModel.load_config(folder)
    with pytest.raises(ZoodipError, match="do not match its config"):
        build_unet(config, torch.float32, "int8", weights=weights)


def test_random_quantized_unet_has_default_init_statistics():
    """Seeded, block by block: reset_parameters draws the same distribution as an eager from_config build."""
    config = UNet2DConditionModel.load_config(CONF_DIR / "arch/tiny/unet")
    torch.manual_seed(5)
    a = build_unet(config, torch.float32, "int8")
    torch.manual_seed(5)
    b = build_unet(config, torch.float32, "int8")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    eager = tiny_unet()
    big = "down_blocks.0.resnets.0.conv1.weight"  # 3x3 conv: kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    w = a.get_submodule(big.removesuffix(".weight")).weight
    dequantized = w._data.float() * w._scale.float()
    bound = 1 / (eager.get_submodule(big.removesuffix(".weight")).weight[0].numel() ** 0.5)
    assert dequantized.abs().max() <= bound * 1.01 and dequantized.std() > 0.5 * bound / 3**0.5
    assert torch.equal(a.get_submodule("conv_norm_out").weight, torch.ones_like(eager.conv_norm_out.weight))


@pytest.mark.slow  # the allocator's behaviour (peak RSS), not a result: measured in BENCHMARKS.md
def test_lean_cpu_heap_returns_large_blocks_at_once():
    """mallopt(M_MMAP_THRESHOLD, 1 MiB), in fresh processes: freed 2 MiB blocks leave the RSS at once (lean),
    where glibc's default keeps them in the heap (fast)."""
    code = (
        "import sys, torch\n"
        "from zoodip.models.loading import set_cpu_memory\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "assert set_cpu_memory(sys.argv[1]) == (sys.argv[1] == 'lean')\n"
        "x = torch.ones(2**20); del x\n"  # a 4 MiB block freed: glibc's default raises its threshold past it
        "before = rss()\n"
        "blocks = [torch.ones(2**19) for _ in range(10)]; pin = torch.ones(2**17)\n"  # 10 x 2 MiB, then pinned
        "del blocks\n"
        "print(rss() - before)\n"
    )
    import subprocess
    import sys

    grown = {
        m: int(
            subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, check=True).stdout.split()[
                -1
            ]
        )
        for m in ("lean", "fast")
    }
    assert grown["lean"] < 4 and grown["fast"] >= 16, grown  # lean unmapped the 20 MiB on free; fast kept it
    with pytest.raises(ZoodipError, match="cpu_memory must be one of"):
        set_cpu_memory("small")


def test_random_model_is_one_model_whatever_the_quantization(tiny_pipeline_dir):
    """model=tiny unquantized, INT8, and loaded back from its zoodip-make-tiny folder: the same weights, so an
    INT8-vs-float comparison on the tiny model compares one model (the UNet is built block-wise for all)."""
    cpu = torch.device("cpu")
    none = load_components("tiny", "random", None, torch.float32, cpu, "none")
    int8 = load_components("tiny", "random", None, torch.float32, cpu, "int8")
    quantize_weights(none.unet, "int8")
    assert same_weights(none.unet, int8.unet)
    folder = load_components("tiny", "pretrained", str(tiny_pipeline_dir), torch.float32, cpu, "int8")
    assert same_weights(folder.unet, int8.unet) and same_weights(folder.vae, int8.vae)
    assert same_weights(folder.text_encoders[0], int8.text_encoders[0])
