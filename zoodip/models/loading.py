"""Load SD1.5 / SD2.1 / SDXL (or the built-in tiny model): pretrained from the hub or a local diffusers
folder, or built from the architecture configs shipped in conf/arch/ with seeded random weights."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from zoodip import CONF_DIR
from zoodip.errors import ZoodipError
from zoodip.models.hub import hub_reachable
from zoodip.models.quantize import (
    DEQUANTIZED_COPY_MAX_BYTES,
    count_quantized,
    dequantized_copy_bytes,
    keep_dequantized_copies,
    quantize_weights,
    use_fast_cpu_int8,
)
from zoodip.models.tokenizer import cached_clip_tokenizer

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXT_ENCODER_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
#: Components a diffusers folder must hold for training (tokenizer_2/text_encoder_2 as well for SDXL).
PIPELINE_PARTS = ["model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "unet/*", "vae/*"]
SDXL_PARTS = ["text_encoder_2/*", "tokenizer_2/*"]


@dataclass
class Components:
    """What training needs: tokenizer and text encoder per encoder (two for SDXL), UNet, VAE, noise schedule."""

    tokenizers: list[CLIPTokenizer]
    text_encoders: list[torch.nn.Module]
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    scheduler: DDPMScheduler
    dtype: torch.dtype
    device: torch.device
    source: str
    quantized: dict[str, float] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def release_vae(self) -> None:
        """Drop the VAE once the reference latents are encoded: training never needs it again."""
        self.vae = None
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap pages mapped otherwise).

    Loading frees the full-precision weights as each part is quantized; without this the process keeps
    their pages resident for the whole run. A no-op where glibc's malloc_trim is unavailable.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (getrusage: KiB on Linux, bytes on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


#: glibc mallopt parameter: allocations at or above this size get their own mmap, returned on free.
_M_MMAP_THRESHOLD = -3
CPU_MEMORY_MODES = ("lean", "fast")


def check_cpu_memory(mode: str, key: str = "train.cpu_memory") -> None:
    """`mode` is one of CPU_MEMORY_MODES, else one sentence naming the setting `key`."""
    if mode not in CPU_MEMORY_MODES:
        raise ZoodipError(f"{key} must be one of {', '.join(CPU_MEMORY_MODES)}, got {mode!r}")


def set_cpu_memory(mode: str, key: str = "train.cpu_memory") -> bool:
    """How this process's heap trades memory for speed (glibc only; returns whether it applied).

    `lean` serves every allocation of 1 MiB or more with its own mapping, handed back to the OS on free.
    glibc's default (`fast`) raises that threshold as large blocks are freed and then reuses heap memory,
    which leaves freed activations resident (a higher peak RSS), but spares the page faults, so iterations run
    faster; the measured trade-off is in BENCHMARKS.md. glibc cannot go back to its adaptive threshold, so
    `fast` leaves a process already set to lean as it is.
    """
    check_cpu_memory(mode, key)
    if mode == "fast":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda[:N]`; `key` names the setting in errors. Creates no CUDA
    context (is_available only counts devices), so zoodip-bench's parent may check its workers' device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    invalid = f"{key} must be auto, cpu or cuda[:N], got {name!r}"
    if name != "cpu" and not name.startswith("cuda"):
        raise ZoodipError(invalid)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ZoodipError(f"{key}={name} but no CUDA device is available; use {key}=cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ZoodipError(invalid) from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ZoodipError(f"{key}={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Activation dtype. `auto` is fp16 on CUDA (the paper's setting) and fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ZoodipError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ZoodipError("model.dtype=fp16 cannot run on the CPU (half-precision convolutions); use bf16 or fp32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ZoodipError(f"model.dtype=bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")
    return dtype


def resolve_pretrained(path: str, sdxl: bool) -> Path:
    """A local diffusers folder for `path` (a folder, or a hub id in the cache or downloadable now).

    Checking reachability first keeps an offline machine from spending minutes in the hub client's retries.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise ZoodipError(f"model.path={path!r} is neither an existing folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    patterns = PIPELINE_PARTS + (SDXL_PARTS if sdxl else [])
    try:
        return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise ZoodipError(
            f"model weights {path!r} are not in the local Hugging Face cache and the hub cannot be reached; "
            f"download them where there is network (huggingface-cli download {path}) or set model.path to a "
            "local diffusers folder"
        )
    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as err:
        raise ZoodipError(f"could not download model weights {path!r}: {err}") from None


def _check_folder(folder: Path, sdxl: bool) -> None:
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (
        ["text_encoder_2", "tokenizer_2"] if sdxl else []
    )
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise ZoodipError(f"{folder} is not a complete diffusers folder: missing {', '.join(missing)}")


def _pretrained_parts(folder: Path, sdxl: bool, dtype: torch.dtype, quantization: str):
    """Yield (name, module) one at a time so each can be quantized before the next is loaded."""
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    for name in encoders:
        cls_name = json.loads((folder / name / "config.json").read_text()).get("architectures", ["CLIPTextModel"])[0]
        yield name, TEXT_ENCODER_CLASSES.get(cls_name, CLIPTextModel).from_pretrained(folder / name, dtype=dtype)
    yield "vae", AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    weights = _safetensors_shards(folder / "unet") if quantization != "none" else None
    if weights:
        try:
            yield (
                "unet",
                build_unet(UNet2DConditionModel.load_config(folder / "unet"), dtype, quantization, weights=weights),
            )
            return
        except ZoodipError as err:  # e.g. an old checkpoint whose names from_pretrained still converts
            log.warning("%s; loading the full-precision UNet first instead", err)
    yield "unet", UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)


def _safetensors_shards(folder: Path) -> dict[str, Path] | None:
    """{tensor name: file} for a diffusers model folder saved as safetensors (one file or an indexed set of
    shards, without a variant); None otherwise (from_pretrained then handles .bin files and variants)."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _random_parts(arch_dir: Path, sdxl: bool, dtype: torch.dtype, seed: int, quantization: str):
    """The real architecture from its shipped configs, with weights drawn from a seeded generator."""
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    for offset, name in enumerate(encoders):
        config = json.loads((arch_dir / name / "config.json").read_text())
        cls = TEXT_ENCODER_CLASSES[config.get("architectures", ["CLIPTextModel"])[0]]
        torch.manual_seed(seed + offset)
        yield name, _cast(cls(CLIPTextConfig.from_dict(config)), dtype)
    yield "vae", random_vae(arch_dir, dtype, seed)
    torch.manual_seed(seed + 20)
    yield "unet", build_unet(UNet2DConditionModel.load_config(arch_dir / "unet"), dtype, quantization)


def _to_fp32(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def quantize_vae(vae: AutoencoderKL, quantization: str) -> AutoencoderKL:
    """Quantize a VAE's weights. One that asks for fp32 (`force_upcast`: SDXL's, the toy world's) is moved to fp32
    first and takes its inputs in fp32, since quanto's weights refuse the later `.to(float32)` of diffusers'
    `upcast_vae` and of `encode_latents`; the half-precision latents of a CUDA run are cast at its entry points."""
    upcast = getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32
    if upcast:
        vae.to(torch.float32)
    quantize_weights(vae, quantization)  # replaces the layers: hooks go on afterwards
    if upcast:
        for module in (vae.encoder, vae.decoder, vae.quant_conv, vae.post_quant_conv):
            if module is not None:
                module.register_forward_pre_hook(_to_fp32)
    return vae


def random_vae(arch_dir: Path, dtype: torch.dtype, seed: int) -> AutoencoderKL:
    """The VAE of `_random_parts`, alone (validation during training reloads it after training released it)."""
    torch.manual_seed(seed + 10)
    return _cast(AutoencoderKL.from_config(AutoencoderKL.load_config(arch_dir / "vae")), dtype)


#: Largest block (in parameters) materialized in fp32 at once while building the UNet (`build_unet`).
BLOCK_PARAMS = 50_000_000


def _blocks(module: torch.nn.Module, prefix: str = ""):
    """(name, module) pieces covering every parameter of `module`, each at most BLOCK_PARAMS parameters
    (or a single layer), in registration order."""
    size = sum(p.numel() for p in module.parameters())
    own = any(True for _ in module.parameters(recurse=False))
    if size == 0:
        return
    if size <= BLOCK_PARAMS or own or not any(True for _ in module.children()):
        yield prefix, module
        return
    for name, child in module.named_children():
        yield from _blocks(child, f"{prefix}.{name}" if prefix else name)


def build_unet(
    config: dict, dtype: torch.dtype, quantization: str, weights: dict[str, Path] | None = None
) -> UNet2DConditionModel:
    """The UNet built on the meta device, then materialized, cast and quantized one block at a time, so no
    full-precision copy of it exists at any moment (zoodip-bench, SD1.5 INT8: load peak 4.75 -> 1.97 GB;
    with quantization "none" no fp32 copy of a half-precision UNet either).

    With `weights` ({tensor name: safetensors file}), each block's tensors are read from the files; without,
    each layer gets PyTorch's default initialization (`reset_parameters`) from the global seeded generator,
    the same distribution as an eager `from_config` build (not the same values: the order differs). The random
    draw does not depend on `quantization` or `dtype`, so INT8 and unquantized runs of one seed compare one
    model.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    expected = set(unet.state_dict())
    if weights is not None and set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ZoodipError(
            f"UNet weights do not match its config: missing {missing[:3]}, unexpected {extra[:3]} "
            f"(of {len(missing)} missing and {len(extra)} unexpected)"
        )
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        for name, block in _blocks(unet):
            prefix = f"{name}." if name else ""
            if weights is None:
                block.to_empty(device="cpu")
                for layer in block.modules():
                    if any(True for _ in layer.parameters(recurse=False)):
                        layer.reset_parameters()
            else:
                state = {}
                for key in block.state_dict():
                    file = weights[prefix + key]
                    if file not in handles:
                        handles[file] = stack.enter_context(safe_open(file, "pt"))
                    state[key] = handles[file].get_tensor(prefix + key)
                block.load_state_dict(state, assign=True)
            block.to(dtype)
            quantize_weights(unet, quantization, include=[name, f"{name}.*"] if name else None)
            release_freed_memory()  # else the heap keeps every freed float block resident
    return unet


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if dtype == torch.float32:
        return module
    return module.to(dtype)


def arch_dir(arch: str) -> Path:
    folder = CONF_DIR / "arch" / arch
    if not folder.is_dir():
        known = sorted(p.name for p in (CONF_DIR / "arch").iterdir() if p.is_dir())
        raise ZoodipError(f"model.arch={arch!r} has no configs in {CONF_DIR / 'arch'}; known: {', '.join(known)}")
    return folder


def is_sdxl_arch(arch: str) -> bool:
    """The one model-family check: an architecture is SDXL when its configs hold a second text encoder."""
    return (arch_dir(arch) / "text_encoder_2").is_dir()


def random_tokenizers(arch: str) -> list[CLIPTokenizer]:
    """The tokenizer(s) of a random-weight build: CLIP's (padded as the arch's tokenizer_config.json says), or
    the toy world's small vocabulary where that file says `"vocabulary": "toyworld"`."""
    pads = json.loads((arch_dir(arch) / "tokenizer_config.json").read_text())
    if pads.get("vocabulary") == "toyworld":
        from zoodip.toyworld.world import world_tokenizer

        return [world_tokenizer()]
    names = ["pad_token", "pad_token_2"] if "pad_token_2" in pads else ["pad_token"]
    return [cached_clip_tokenizer(pads[name]) for name in names]


@dataclass(frozen=True)
class ModelSettings:
    """The model a run loads: the `model` group's weights and the `quantization` group, typed once by
    `zoodip.schema.model_settings`."""

    arch: str
    init: str = "pretrained"  # pretrained | random (seeded)
    path: str | None = None  # hub id or diffusers folder (init=pretrained)
    dtype: str = "auto"
    seed: int = 0
    resolution: int = 512
    weights: str = "none"  # quantization.weights: the U-Net's
    others: str | None = None  # quantization.others: the VAE's and the text encoder(s)'; None: as `weights`
    dequantized_copy: bool | None = None

    @property
    def is_sdxl(self) -> bool:
        return is_sdxl_arch(self.arch)

    def folder(self) -> Path | None:
        """The local diffusers folder of pretrained weights; None for seeded random ones."""
        return resolve_pretrained(self.path, self.is_sdxl) if self.init == "pretrained" else None

    def load(self, device: torch.device, dtype: torch.dtype | None = None) -> Components:
        """`load_components` with these settings (`dtype`: the activations, default `self.dtype` on `device`)."""
        return load_components(
            self.arch,
            self.init,
            self.path,
            dtype or resolve_dtype(self.dtype, device),
            device,
            self.weights,
            seed=self.seed,
            others=self.others,
            dequantized_copy=self.dequantized_copy,
        )


def load_components(
    arch: str,
    init: str,
    path: str | None,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str,
    seed: int = 0,
    fast_cpu_int8: bool = True,
    others: str | None = None,
    dequantized_copy: bool | None = None,
) -> Components:
    """Load every component, quantizing each right after it is loaded (never two full-precision copies; the
    UNet is built quantized block by block). `quantization` is the UNet's weight type and `others` that of the
    VAE and text encoder(s) (default: the same; INT4 keeps them INT8, paper S3.2 / Table S8). On the CPU, INT8
    layers run through `use_fast_cpu_int8`, and keep a dequantized copy of their weights where `dequantized_copy`
    says so (None: when the copies take at most DEQUANTIZED_COPY_MAX_BYTES; the numbers are the same either way)."""
    others = others or quantization
    sdxl = is_sdxl_arch(arch)
    if init == "random":
        source = f"random:{arch}:seed{seed}"
        tokenizers = random_tokenizers(arch)
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(arch_dir(arch) / "scheduler"))
        parts = _random_parts(arch_dir(arch), sdxl, dtype, seed, quantization)
    elif init == "pretrained":
        if not path:
            raise ZoodipError("model.init=pretrained needs model.path (a hub id or a local diffusers folder)")
        folder = resolve_pretrained(path, sdxl)
        _check_folder(folder, sdxl)
        source = path
        tok_names = ["tokenizer", "tokenizer_2"] if sdxl else ["tokenizer"]
        tokenizers = [CLIPTokenizer.from_pretrained(folder / name) for name in tok_names]
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        parts = _pretrained_parts(folder, sdxl, dtype, quantization)
    else:
        raise ZoodipError(f"model.init must be pretrained or random, got {init!r}")

    modules: dict[str, torch.nn.Module] = {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers warns on every `.to()` of a model built in code
    try:
        for name, module in parts:
            module.requires_grad_(False).eval()
            weights = quantization if name == "unet" else others
            if name == "vae":
                quantize_vae(module, weights)
            elif count_quantized(module)[0] == 0:  # the UNet comes built quantized
                quantize_weights(module, weights)
            if fast_cpu_int8 and weights == "int8" and device.type == "cpu":
                use_fast_cpu_int8(module)
            modules[name] = module.to(device)
            gc.collect()
    except (OSError, ValueError) as err:
        raise ZoodipError(f"could not load the model from {source!r}: {err}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    release_freed_memory()
    if fast_cpu_int8 and device.type == "cpu" and dequantized_copy is not False:
        size = dequantized_copy_bytes(list(modules.values()), dtype)
        if dequantized_copy or size <= DEQUANTIZED_COPY_MAX_BYTES:
            keep_dequantized_copies(list(modules.values()), dtype)
    encoders = [modules[n] for n in ("text_encoder", "text_encoder_2") if n in modules]
    return Components(tokenizers, encoders, modules["unet"], modules["vae"], scheduler, dtype, device, source)
