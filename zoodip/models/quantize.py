"""Weight quantization with optimum-quanto (paper Eq. 2, S1.3): every Linear and Conv2d, nothing else."""

from __future__ import annotations

import contextlib
import logging
import types
import warnings

import torch
import torch.nn.functional as F

from zoodip.errors import ZoodipError

QUANTIZATIONS = ("int8", "int4", "none")


def quantize_weights(module: torch.nn.Module, quantization: str, include: list[str] | None = None) -> None:
    """Quantize, in place, the weights of every nn.Linear and nn.Conv2d of `module` (or of its submodules
    named by the fnmatch patterns `include`) and free the float copies.

    Embeddings and normalization layers stay float (quanto only quantizes LayerNorm when activations are
    quantized, which they are not here). `freeze` replaces each float weight by its integer form at once.
    """
    if quantization not in QUANTIZATIONS:
        raise ZoodipError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    if quantization == "none":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from optimum.quanto import qint4, qint8, quantize
        from optimum.quanto.nn import QModuleMixin

    quantize(module, weights={"int8": qint8, "int4": qint4}[quantization], include=include)
    for layer in module.modules():
        if isinstance(layer, QModuleMixin) and not layer.frozen:
            layer.freeze()
            if quantization == "int4" and isinstance(layer, torch.nn.Linear):
                layer.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(layer: torch.nn.Module, args: tuple) -> tuple:
    """quanto's packed-INT4 bf16 CPU matmul (torch._weight_int4pack_mm) rejects strided inputs, such as the
    permuted feature map that SD2.1's and SDXL's `proj_in` (use_linear_projection) get at batch size 1."""
    return (args[0].contiguous(), *args[1:])


#: Below this many activation rows a bf16 Linear keeps quanto's torch._weight_int8pack_mm (a matrix-vector
#: kernel: right for the time embedding's 1-3 rows; from 77 rows up, dequantize + bf16 GEMM measured 1.5-3.8x
#: faster, `python -m zoodip.tools.bench_kernels`).
INT8PACK_MAX_ROWS = 16
_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequantize_into_workspace(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = q * s (Eq. 2 inverted) for one layer, written into one buffer shared by every layer.

    Each forward dequantizes every layer; a fresh tensor per layer costs a page-faulting allocation (most
    of quanto's CPU overhead in fp32) and leaves the allocator's heap fragmented. The buffer is as large as
    the largest layer and is created outside inference mode so no_grad forwards may write it too.
    """
    data, scale = weight._data, weight._scale
    key = (data.device, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < data.numel():
        with torch.inference_mode(False):
            buffer = _workspaces[key] = torch.empty(data.numel(), dtype=dtype, device=data.device)
    out = buffer[: data.numel()].view(data.shape)
    return torch.mul(data, scale if scale.dtype == dtype else scale.to(dtype), out=out)


def _keeps_quanto(layer: torch.nn.Module) -> bool:
    """Where the shared buffer cannot serve, the layer runs quanto's own kernels: under autograd (backward
    would keep the buffer) and under torch.compile (the compiled SD1.5 UNet then held a dequantized copy of
    every weight, training peak 5.74 GB against 2.08 GB with quanto's kernels compiled; BENCHMARKS.md). A layer
    that keeps its own dequantized copy (`keep_dequantized_copies`) compiles with it."""
    if torch.is_grad_enabled():
        return True
    return torch.compiler.is_compiling() and not hasattr(layer, "_dequantized_copies")


def _dequantized(self: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """This layer's W = q * s in `dtype`: its own copy, made once, when the layer keeps one
    (`keep_dequantized_copies`), else written into the shared buffer at every call. The same product
    either way, so a kept copy changes the speed, never the numbers."""
    copies = getattr(self, "_dequantized_copies", None)
    if copies is None:
        return dequantize_into_workspace(self.weight, dtype)
    if dtype not in copies:
        data, scale = self.weight._data, self.weight._scale
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable under no_grad forwards too
            copies[dtype] = torch.mul(data, scale if scale.dtype == dtype else scale.to(dtype))
    return copies[dtype]


def _int8_linear_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _keeps_quanto(self):
        return self._quanto_forward(x)
    rows = x.numel() // x.shape[-1]
    if x.dtype == torch.bfloat16 and rows < INT8PACK_MAX_ROWS:
        return self._quanto_forward(x)
    return F.linear(x, _dequantized(self, x.dtype), self.bias)


def _int8_conv2d_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _keeps_quanto(self):
        return self._quanto_forward(x)
    return self._conv_forward(x, _dequantized(self, x.dtype), self.bias)


#: `quantization.dequantized_copy: null` (auto) keeps a dequantized copy of every CPU INT8 layer when the copies
#: of a model take at most this much: the toy world's take 30 MB; SD1.5's would take about 4 GB in fp32 (estimated
#: from its parameter count, not measured).
DEQUANTIZED_COPY_MAX_BYTES = 512 * 2**20


def int8_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The frozen INT8 Linear/Conv2d layers of `module` whose weights sit on the CPU."""
    from optimum.quanto.nn import QConv2d, QLinear
    from optimum.quanto.tensor.weights.qbytes import WeightQBytesTensor

    return [
        layer
        for layer in module.modules()
        if isinstance(layer, (QLinear, QConv2d))
        and type(layer.weight) is WeightQBytesTensor
        and layer.weight.device.type == "cpu"
    ]


def dequantized_copy_bytes(modules: list[torch.nn.Module], dtype: torch.dtype) -> int:
    """What dequantized copies of every CPU INT8 weight of `modules` would take in `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(layer.weight.numel() * size for m in modules for layer in int8_layers(m))


def use_fast_cpu_int8(module: torch.nn.Module) -> int:
    """Run the frozen INT8 Linear/Conv2d layers of `module` through bf16/fp32 GEMM and convolution kernels.

    Storage stays quanto's (int8 data + per-channel scales): only the CPU forward changes. Measured on 2
    cores (SD1.5 UNet, 64x64 latent, bf16): quanto 5.2 s per forward, this 3.8 s, unquantized bf16 4.0 s.
    On CUDA quanto's kernels are kept. Returns how many layers were switched.
    """
    switched = 0
    for layer in int8_layers(module):
        if hasattr(layer, "_quanto_forward"):
            continue
        layer._quanto_forward = layer.forward
        fast = _int8_linear_forward if isinstance(layer, torch.nn.Linear) else _int8_conv2d_forward
        layer.forward = types.MethodType(fast, layer)
        switched += 1
    return switched


def keep_dequantized_copies(modules: list[torch.nn.Module], dtype: torch.dtype) -> int:
    """Let every layer switched by `use_fast_cpu_int8` keep its dequantized weight, made here in `dtype` (in
    another dtype at its first forward in it), instead of dequantizing at every forward: for models whose copies
    cost little, where dequantization is a large share of a forward. Returns how many layers keep one."""
    kept = 0
    for module in modules:
        for layer in int8_layers(module):
            if hasattr(layer, "_quanto_forward") and not hasattr(layer, "_dequantized_copies"):
                layer._dequantized_copies = {}
                _dequantized(layer, dtype)
                kept += 1
    return kept


def count_quantized(module: torch.nn.Module) -> tuple[int, int]:
    """(quantized weight elements, all parameter elements) of `module`."""
    from optimum.quanto.nn import QModuleMixin

    quantized = sum(
        m.weight.numel() for m in module.modules() if isinstance(m, QModuleMixin) and m.weight_qtype is not None
    )
    return quantized, sum(p.numel() for p in module.parameters())


def quantized_fraction(modules: list[torch.nn.Module]) -> float:
    """Fraction of all parameters held in quantized form (the paper reports 96.4% for SD1.5, S1.3)."""
    counts = [count_quantized(m) for m in modules]
    total = sum(t for _, t in counts)
    return sum(q for q, _ in counts) / total if total else 0.0


def weight_type(module: torch.nn.Module) -> str:
    """int8 / int4 / none: the weight type of a loaded component's quantized layers."""
    from optimum.quanto.nn import QModuleMixin

    for layer in module.modules():
        if isinstance(layer, QModuleMixin) and layer.weight_qtype is not None:
            return {"qint8": "int8", "qint4": "int4"}.get(layer.weight_qtype.name, layer.weight_qtype.name)
    return "none"


def weights_by_component(parts) -> dict[str, str]:
    """metrics.json's `weights_by_component`, e.g. {unet: int4, text_encoder: int8, vae: int8} (paper Table S8)."""
    named = {"unet": parts.unet, **({"vae": parts.vae} if parts.vae is not None else {})}
    for i, encoder in enumerate(parts.text_encoders):
        named["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    return {name: weight_type(module) for name, module in named.items()}


def forward_mode(quantization: str) -> contextlib.AbstractContextManager:
    """No-autograd context for zeroth-order forwards.

    torch.inference_mode everywhere, except INT4: quanto's packed int4 weights transpose themselves inside
    the matmul, which inference tensors forbid ("Cannot set version_counter"), so INT4 uses no_grad.
    """
    return torch.no_grad() if quantization == "int4" else torch.inference_mode()
