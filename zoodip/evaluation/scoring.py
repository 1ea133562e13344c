"""Evaluation scores of the paper: CLIP-I, CLIP-T and DINO (S1.2) and DINO_inter (S3.3).

The metric functions are pure math on embedding tensors; `ClipScorer` and `DinoScorer` turn PIL images (and
texts) into L2-normalised float32 embeddings with the paper's backbones (openai/clip-vit-base-patch32,
facebook/dinov2-base). `write_tiny_eval_models` writes tiny random stand-ins for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from zoodip.errors import ZoodipError
from zoodip.models.hub import hub_reachable as _hub_reachable

CLIP_PATH = "openai/clip-vit-base-patch32"
DINO_PATH = "facebook/dinov2-base"
OPEN_CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32 in open_clip (OpenAI's weights need QuickGELU)
OPEN_CLIP_PRETRAINED = "openai"

# ---------------------------------------------------------------------------------------------------------------
# metric math


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n_a, n_b] cosine similarities between the rows of a [n_a, d] and b [n_b, d]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ZoodipError(
            f"embeddings must be non-empty [n, d] tensors of one width, got {list(a.shape)}, {list(b.shape)}"
        )
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def clip_i_per_image(ref_img_emb: torch.Tensor, gen_img_emb: torch.Tensor) -> torch.Tensor:
    """[n_gen]: each generated image's mean cosine against all reference images (CLIP-I per image, S1.2)."""
    return cosine_matrix(gen_img_emb, ref_img_emb).mean(dim=1)


def clip_i(ref_img_emb: torch.Tensor, gen_img_emb: torch.Tensor) -> float:
    """CLIP-I (S1.2): mean cosine over all reference-generated pairs of CLIP image embeddings."""
    return clip_i_per_image(ref_img_emb, gen_img_emb).mean().item()


def clip_t(text_emb: torch.Tensor, gen_img_emb: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image (S1.2): cosine between row i of gen_img_emb and row i of text_emb (its prompt's text).

    Returns [n]; the paper's CLIP-T is the mean of it.
    """
    if text_emb.shape != gen_img_emb.shape:
        raise ZoodipError(
            f"CLIP-T needs one text embedding per image (row-aligned), got shapes {list(text_emb.shape)} for the "
            f"texts and {list(gen_img_emb.shape)} for the images"
        )
    return F.cosine_similarity(text_emb.float(), gen_img_emb.float(), dim=-1)


def dino_per_image(ref_emb: torch.Tensor, gen_emb: torch.Tensor) -> torch.Tensor:
    """[n_gen]: each generated image's mean DINO cosine against all reference images (DINO per image, S1.2)."""
    return cosine_matrix(gen_emb, ref_emb).mean(dim=1)


def dino(ref_emb: torch.Tensor, gen_emb: torch.Tensor) -> float:
    """DINO (S1.2): mean cosine over all reference-generated pairs of DINOv2 embeddings."""
    return dino_per_image(ref_emb, gen_emb).mean().item()


def dino_inter(gen_emb: torch.Tensor) -> float:
    """DINO_inter (S3.3): mean cosine over distinct pairs i<j of generated images; lower means more diverse."""
    if len(gen_emb) < 2:
        raise ZoodipError(f"DINO_inter needs at least 2 generated images, got {len(gen_emb)}")
    sim = cosine_matrix(gen_emb, gen_emb)
    i, j = torch.triu_indices(len(sim), len(sim), offset=1)
    return sim[i, j].mean().item()


# ---------------------------------------------------------------------------------------------------------------
# loading weights: a local folder, the Hugging Face cache, or the hub (only when it can be reached)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _load(what: str, key: str, path: str, load: Callable[[str, bool], tuple]) -> tuple:
    """Run load(source, local_files_only) on a local folder, else on a hub id: the cache first, then the network.

    The hub client retries for ~25 s per file when there is no network, so the network is only tried when the hub
    answers a 3 s connection check; HF_HUB_OFFLINE=1 skips it.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        try:
            return load(str(local), True)
        except Exception as err:
            raise ZoodipError(
                f"could not load {what} weights from folder {str(local)!r} ({_first_line(err)}); "
                f"point {key} at a folder written by save_pretrained"
            ) from None
    if local.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise ZoodipError(
            f"{key}={path!r} is neither an existing folder nor a hub id like 'org/name'; "
            f"set {key} to a local folder holding the {what} weights"
        )
    try:
        return load(path, True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ZoodipError(
            f"could not load {what} weights {path!r}: not in the local Hugging Face cache and no "
            f"network; download them where there is network or set {key} to a local folder"
        )
    try:
        return load(path, False)
    except Exception as err:
        raise ZoodipError(
            f"could not download {what} weights {path!r} ({_first_line(err)}); check the hub id "
            f"or set {key} to a local folder"
        ) from None


def _image_processor(source: str, local_only: bool):
    """The PIL-backed image processor (the one the paper's transformers 4.x used; v5 defaults to torchvision)."""
    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return transformers.AutoImageProcessor.from_pretrained(source, local_files_only=local_only, **backend)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.inference_mode()
def _embed(items: list, batch_size: int, fn: Callable[[list], torch.Tensor]) -> torch.Tensor:
    if not items:
        raise ZoodipError("nothing to embed: got an empty list")
    out = [fn(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# backbones


class ClipScorer:
    """CLIP image and text embeddings for CLIP-I and CLIP-T (S1.2: openai/clip-vit-base-patch32 from Hugging Face).

    backend="transformers" loads `path` (a hub id or a save_pretrained folder). backend="open_clip" ignores `path`
    and loads open_clip_model (default ViT-B-32-quickgelu; or "local-dir:/folder", "hf-hub:org/name") with
    open_clip_pretrained (default openai; a tag or a checkpoint file).
    """

    def __init__(
        self,
        path: str | Path = CLIP_PATH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "transformers",
        open_clip_model: str | None = None,
        open_clip_pretrained: str | None = None,
        batch_size: int = 32,
    ):
        self.device, self.dtype, self.batch_size, self.backend = torch.device(device), dtype, batch_size, backend
        if backend == "transformers":
            self.model, self.processor, self.tokenizer = _load("CLIP", "eval.clip.path", str(path), _load_hf_clip)
        elif backend == "open_clip":
            self.model, self.processor, self.tokenizer = _load_open_clip(
                open_clip_model or OPEN_CLIP_MODEL, open_clip_pretrained or OPEN_CLIP_PRETRAINED
            )
        else:
            raise ZoodipError(f"eval.clip.backend must be transformers or open_clip, got {backend!r}")
        self.model.to(self.device, self.dtype).eval()

    def _images(self, batch: list[Image.Image]) -> torch.Tensor:
        if self.backend == "open_clip":
            pixels = torch.stack([self.processor(im.convert("RGB")) for im in batch])
            return self.model.encode_image(pixels.to(self.device, self.dtype))
        pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt").pixel_values
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    def _texts(self, batch: list[str]) -> torch.Tensor:
        if self.backend == "open_clip":
            return self.model.encode_text(self.tokenizer(batch).to(self.device))
        tok = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask))

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, d] L2-normalised float32 CLIP image embeddings (on the CPU)."""
        return _embed(list(images), self.batch_size, self._images)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[n, d] L2-normalised float32 CLIP text embeddings (on the CPU)."""
        return _embed(list(texts), self.batch_size, self._texts)


def _load_hf_clip(source: str, local_only: bool) -> tuple:
    model = transformers.CLIPModel.from_pretrained(source, local_files_only=local_only)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(source, local_files_only=local_only)
    return model, _image_processor(source, local_only), tokenizer


@contextlib.contextmanager
def _hub_cache_only():
    """Hub downloads read the local cache only (no retries), and open_clip's ERROR log of a cache miss is muted."""
    import huggingface_hub.constants

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.CRITICAL)
    try:
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True):
            yield
    finally:
        root.setLevel(level)


def _load_open_clip(model_name: str, pretrained: str) -> tuple:
    import open_clip

    key = "eval.clip.open_clip_model"
    if model_name.startswith(("local-dir:", "hf-hub:")):  # open_clip ignores `pretrained` for these
        what, pretrained, quick_gelu = model_name, None, False
        local = model_name.startswith("local-dir:")
    else:
        if open_clip.get_model_config(model_name) is None:
            known = ", ".join(open_clip.list_models()[:4])
            raise ZoodipError(f"{key}={model_name!r} is not an open_clip model; known ones include {known}")
        tag = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag and not os.path.isfile(pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name))
            raise ZoodipError(
                f"eval.clip.open_clip_pretrained={pretrained!r} is neither a checkpoint file nor a tag of {model_name} "
                f"({tags})"
            )
        # OpenAI's weights were trained with QuickGELU; open_clip only warns when the config says otherwise.
        what, quick_gelu, local = f"{model_name} {pretrained}", bool(tag.get("quick_gelu")), not tag

    def load() -> tuple:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, force_quick_gelu=quick_gelu
        )
        return model, preprocess, open_clip.get_tokenizer(model_name)

    if local:
        try:
            return load()
        except Exception as err:
            raise ZoodipError(
                f"could not load open_clip weights {what!r} ({_first_line(err)}); check {key} and "
                "eval.clip.open_clip_pretrained"
            ) from None
    try:
        with _hub_cache_only():
            return load()
    except Exception:
        pass
    if not _hub_reachable():
        raise ZoodipError(
            f"could not load open_clip weights {what!r}: not in the local Hugging Face cache and no network; "
            "download them where there is network or set eval.clip.open_clip_pretrained to a checkpoint file"
        )
    try:
        return load()
    except Exception as err:
        raise ZoodipError(f"could not download open_clip weights {what!r} ({_first_line(err)}); check {key}") from None


class DinoScorer:
    """DINOv2 image embeddings for DINO and DINO_inter (S1.2, S3.3: facebook/dinov2-base from Hugging Face).

    The embedding is the CLS token of last_hidden_state (after the final layer norm), the global image feature that
    DreamBooth-style DINO scores compare.
    """

    def __init__(
        self,
        path: str | Path = DINO_PATH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ):
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.model, self.processor = _load("DINOv2", "eval.dino.path", str(path), _load_hf_dino)
        self.model.to(self.device, self.dtype).eval()

    def _images(self, batch: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt").pixel_values
        return self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state[:, 0]

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, d] L2-normalised float32 DINOv2 CLS embeddings (on the CPU)."""
        return _embed(list(images), self.batch_size, self._images)


def _load_hf_dino(source: str, local_only: bool) -> tuple:
    model = transformers.AutoModel.from_pretrained(source, local_files_only=local_only)
    return model, _image_processor(source, local_only)


# ---------------------------------------------------------------------------------------------------------------
# tiny random stand-ins


def write_tiny_eval_models(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny seeded random CLIP (transformers and open_clip) and DINOv2 models with their processors.

    Returns {"clip", "dinov2", "open_clip"} folders: ClipScorer(path=out["clip"]), DinoScorer(path=out["dinov2"])
    and ClipScorer(backend="open_clip", open_clip_model=f"local-dir:{out['open_clip']}") load them exactly like real
    weights. Two calls with one seed write identical weights.
    """
    import open_clip

    from zoodip.models.tokenizer import clip_tokenizer

    directory = Path(directory)
    out = {"clip": directory / "clip", "dinov2": directory / "dinov2", "open_clip": directory / "open_clip"}
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    open_clip_cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
        )
        torch.manual_seed(seed)
        dinov2 = transformers.Dinov2Model(
            transformers.Dinov2Config(
                image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
            )
        )
        torch.manual_seed(seed)
        oc = open_clip.CLIP(**open_clip_cfg)

    clip.save_pretrained(out["clip"])
    crop = {"height": 32, "width": 32}
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(out["clip"])

    dinov2.save_pretrained(out["dinov2"])
    # dinov2-base resizes the short side to 256 and crops 224; the tiny one keeps that ratio at 36 -> 32.
    transformers.BitImageProcessor(
        size={"shortest_edge": 36}, crop_size=crop, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    ).save_pretrained(out["dinov2"])

    from safetensors.torch import save_file

    out["open_clip"].mkdir(parents=True, exist_ok=True)
    (out["open_clip"] / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_cfg}, indent=2))
    state = {k: v.contiguous() for k, v in oc.state_dict().items()}
    save_file(state, out["open_clip"] / "open_clip_model.safetensors")
    return out
