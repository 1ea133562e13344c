"""Reference images, prompts, and the planted diagnostic task."""

from __future__ import annotations

import csv
import json
import logging
import os
import stat
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from zoodip.errors import ZoodipError

log = logging.getLogger(__name__)
SUBJECTS_CSV = Path(__file__).parents[1] / "assets" / "dreambooth_subjects.csv"
#: The reference images, for training and evaluation alike: a file with one of these suffixes (any case) ...
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
#: ... whose content one of these Pillow decoders reads (no other is tried: e.g. not EPS, which runs Ghostscript).
#: JPEG also opens MPO, the multi-picture JPEG of many phone cameras; an animated GIF or WebP gives its first frame.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
#: An image whose shorter side exceeds this is reduced while loading (JPEG: decoded at 1/2, 1/4 or 1/8 scale; the
#: others: by an integer factor), its shorter side staying at least this: above every training resolution.
LOAD_MIN_SIDE = 2048

# Textual Inversion's ImageNet templates (Gal et al. 2022), used by TI, GF-TI and here when no captions exist.
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]
# The toy world's templates: only words of its vocabulary (zoodip/toyworld/world.py), the placeholder standing for
# "a <colour> <shape>" as in its captions.
TOYWORLD_TEMPLATES = ["a photo of {}", "{}"]
#: data.template -> the prompts used when a subject has no captions.
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "toyworld": TOYWORLD_TEMPLATES}


def subject_table() -> dict[str, dict[str, str]]:
    """The 30 DreamBooth subjects: class noun, living flag and a one-token initializer."""
    with SUBJECTS_CSV.open() as f:
        return {row["subject"]: row for row in csv.DictReader(f)}


@dataclass(frozen=True)
class DataSettings:
    """The subject and its training data (the `data` group), typed once by `zoodip.schema.data_settings`."""

    kind: str  # dreambooth (reference images) | planted (the known-answer diagnostic)
    subject: str | None
    path: str | None  # the reference images' folder
    placeholder: str  # data.placeholder_token
    initializer: str | None  # the word that starts the token; None: no config names one (`initializer_word`)
    initializer_source: str  # which key chose it, for messages
    num_vectors: int = 1
    resolution: int = 512
    flip_p: float = 0.0
    init_embedding: str | None = None
    allow_pickle: bool = False
    captions: str | None = None
    template: str = "object"
    planted_rank: int = 32
    planted_scale: float = 1.0
    num_images: int = 4
    eval_points: int = 16
    seed: int = 1234

    def initializer_word(self) -> str:
        """The initializer, or one sentence saying how to set it (a run config of an older zoodip may name none)."""
        if self.initializer is None:
            raise ZoodipError(
                f"data.initializer_token is not set and data.subject={self.subject!r} is not a DreamBooth subject; "
                "set data.initializer_token to one word describing the subject (e.g. dog)"
            )
        return self.initializer


def center_square(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square of the image, resized (bicubic) to resolution x resolution."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1], as the VAE takes it."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class ReferenceImages:
    """The usable images of a reference folder, their file names, and every name in the folder (read or not)."""

    images: list[Image.Image]  # RGB, EXIF orientation applied; squares when read for training
    names: list[str]
    entries: list[str]

    def tensor(self) -> torch.Tensor:
        return torch.stack([to_tensor(im) for im in self.images])


def shown(name: str) -> str:
    """A file name as messages print it: itself, or its repr when it is not printable text (a name that is not
    UTF-8 holds surrogate escapes, which no UTF-8 terminal or log file accepts)."""
    return name if name.isprintable() else repr(name)


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float grey scaled down (not clipped), transparency composited onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = 65535.0 if array.max() > 255 else 1.0 if image.mode == "F" and array.max() <= 1 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _decode(path: Path) -> Image.Image:
    """One image within bounds: only IMAGE_FORMATS' decoders; more than Image.MAX_IMAGE_PIXELS pixels is an error
    (the warning raised as one, here only); a shorter side above LOAD_MIN_SIDE reduced while loading; the EXIF
    orientation applied; 8-bit RGB. Raises whatever went wrong."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            if im.format in ("JPEG", "MPO") and min(im.size) >= 2 * LOAD_MIN_SIDE:
                im.draft("RGB", (LOAD_MIN_SIDE, LOAD_MIN_SIDE))  # decoded at 1/2, 1/4 or 1/8 scale
            im.load()
            try:
                image = ImageOps.exif_transpose(im)
            except Exception:  # a damaged EXIF block in an intact image: its pixels as stored
                image = im.copy()
    image = _to_rgb(image)
    factor = min(image.size) // LOAD_MIN_SIDE
    return image.reduce(factor) if factor >= 2 else image


def _why(err: Exception) -> str:
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return "too many pixels (above Image.MAX_IMAGE_PIXELS: a decompression bomb?)"
    if isinstance(err, UnidentifiedImageError):
        return "not a JPEG, PNG, WebP, BMP, TIFF or GIF image"
    if isinstance(err, OSError) and err.strerror:
        return f"unreadable: {err.strerror}"
    return f"unreadable: {type(err).__name__}: {str(err)[:80]}".rstrip(": ")


def read_reference_images(path: str | None, resolution: int | None = None) -> ReferenceImages:
    """The one reader of a reference folder (data.path), for training, validation and evaluation.

    Files directly in the folder, in name order, with an IMAGE_SUFFIXES suffix and an IMAGE_FORMATS content,
    decoded by `_decode`; `resolution`: each one center-cropped and resized to that square as soon as it is read
    (what training sees), else full size. Hidden files, sub-folders, other files and unreadable images are skipped
    with one warning naming them all. A folder with no usable image is a ZoodipError."""
    if not path:
        raise ZoodipError("data.path is not set; point it at a folder of reference images (data.path=DIR)")
    folder = Path(path).expanduser()
    where = f"data.path={str(folder)!r}"
    try:
        entries = sorted(os.listdir(folder))
    except NotADirectoryError:
        raise ZoodipError(f"{where} is not a folder but a file; point it at the folder that holds the images") from None
    except FileNotFoundError:
        raise ZoodipError(f"{where} is not a folder (it does not exist)") from None
    except OSError as err:
        raise ZoodipError(f"{where} is not a folder that can be listed ({err.strerror or err})") from None
    if not entries:
        raise ZoodipError(f"{where} is empty; put the subject's reference images there")
    images, names, skipped = [], [], []
    for name in entries:
        image = _read_entry(folder / name)
        if isinstance(image, str):
            skipped.append(f"{shown(name)} ({image})")
            continue
        images.append(center_square(image, resolution) if resolution else image)
        names.append(name)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ZoodipError(f"{where} holds no readable image ({suffixes}); skipped {'; '.join(skipped)}")
    if skipped:
        log.warning("%s: skipping %s", where, "; ".join(skipped))
    return ReferenceImages(images, names, entries)


def _read_entry(file: Path) -> Image.Image | str:
    """A folder entry's image, or why it is not a reference image."""
    if file.name.startswith("."):
        return "hidden"
    try:
        info = os.stat(file)  # follows symbolic links: a loop or a dangling one fails here
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if stat.S_ISDIR(info.st_mode):
        return "a sub-folder: not searched"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"  # e.g. a FIFO, which would block the reader forever
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file name"
    if info.st_size == 0:
        return "an empty file"
    try:
        return _decode(file)
    except Exception as err:  # any decoder failure on hostile bytes skips this file, not the run
        return _why(err)


def load_reference_images(path: str | None, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The reference images as training sees them: (N, 3, resolution, resolution) in [-1, 1], and their names."""
    refs = read_reference_images(path, resolution)
    return refs.tensor(), refs.names


def _slot_problem(caption: str) -> str | None:
    """What is wrong with a caption as a template (str.format with the placeholder), or None."""
    try:
        fields = [(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(caption) if n is not None]
    except ValueError as err:
        return f"is not a valid template ({err}; a literal brace is written '{{{{' or '}}}}')"
    if not fields:
        return "has no '{}' where the placeholder goes"
    if len(fields) > 1:
        return f"has {len(fields)} fields in braces"
    field_name, spec, conv = fields[0]
    if field_name or spec or conv:
        text = "{" + field_name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        return f"has the field {text!r} instead of '{{}}'"
    return None


def load_captions(
    path: str | None, subject: str | None, names: list[str], entries: list[str] | None = None
) -> list[str] | None:
    """Comprehensive captions (DCO format {subject: {file: "caption with {}"}}), one per image, or None.

    Every flaw is a ZoodipError naming the file and the entry: not JSON, not an object of objects, no entry for
    the subject, a caption that is not a string or has not exactly one "{}" (and no other field), an image without
    a caption, a caption for a file name that is not in the folder (`entries`, default `names`)."""
    if not path:
        return None
    file = Path(path).expanduser()
    where = f"data.captions={str(file)!r}"
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ZoodipError(f"{where} is not a readable JSON file ({err})") from None
    shape = "a JSON object {subject: {image file name: caption}}"
    if not isinstance(table, dict):
        raise ZoodipError(f"{where} must be {shape}, not a JSON {type(table).__name__}")
    for key, value in table.items():
        if not isinstance(value, dict):
            raise ZoodipError(
                f"{where}: entry {key!r} must be {{image file name: caption}}, not {type(value).__name__}"
            )
    if subject not in table:
        raise ZoodipError(f"{where} has no entry for subject {subject!r}")
    captions = table[subject]
    for image, caption in captions.items():
        entry = f"{where}, entry [{subject!r}][{image!r}]"
        if not isinstance(caption, str):
            raise ZoodipError(f"{entry}: the caption must be a string, not {type(caption).__name__}")
        problem = _slot_problem(caption)
        if problem:
            raise ZoodipError(f"{entry}: caption {caption[:60]!r} {problem}; it needs exactly one '{{}}'")
    known = set(names if entries is None else entries)
    unknown = [n for n in captions if n not in known]
    if unknown:
        raise ZoodipError(f"{where}, entry [{subject!r}][{unknown[0]!r}]: data.path has no file of that name")
    missing = [n for n in names if n not in captions]
    if missing:
        listed = ", ".join(shown(n) for n in missing[:3])
        raise ZoodipError(f"{where} has no caption for {listed} of subject {subject!r} (entry [{subject!r}])")
    return [captions[n] for n in names]


def read_caption_files(folder: str | Path, names: list[str], placeholder: str) -> list[str] | None:
    """Per-image caption files, the kohya / diffusers habit: `<image stem>.txt` beside each image, one caption
    with "{}" (or the placeholder itself, e.g. "<dog6>") where the token goes. None when the folder has none;
    a folder where some images have one and others not is a ZoodipError naming the first without."""
    folder = Path(folder).expanduser()
    files = [folder / f"{Path(n).stem}.txt" for n in names]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = names[present.index(False)]
        raise ZoodipError(
            f"{shown(missing)} in data.path has no caption file {Path(missing).stem}.txt beside it, "
            "but other images have one: give every image a caption, or none"
        )
    captions = []
    for file in files:
        try:
            text = " ".join(file.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as err:
            raise ZoodipError(f"caption file {file} is not readable UTF-8 text ({err})") from None
        if "{}" not in text and placeholder in text:
            text = text.replace("{", "{{").replace("}", "}}").replace(placeholder, "{}", 1)
        problem = _slot_problem(text)
        if problem:
            raise ZoodipError(f"caption file {file}: {text[:60]!r} {problem}; write '{{}}' or {placeholder} once")
        captions.append(text)
    return captions


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for each image, times the VAE's scaling factor (encoded once, one image at a time)."""
    upcast = getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else next(vae.parameters()).dtype
    if upcast and next(vae.parameters()).dtype != torch.float32:  # a quantized one is fp32 already (quantize_vae)
        vae.to(torch.float32)
    means, stds = [], []
    for image in images:
        dist = vae.encode(image[None].to(device, dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


@dataclass
class Reference:
    """Encoded reference latents (as q(z|x) mean and std) and a prompt for each image."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor
    prompts: list[list[str]]  # per image: its caption, or the templates, each with "{}" for the placeholder
    flipped: tuple[torch.Tensor, torch.Tensor] | None = None  # mean and std of the mirrored images
    flip_p: float = 0.0

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        """z ~ E(x) for a random reference image x (mirrored with probability flip_p), and a prompt for it."""
        i = int(torch.randint(len(self.mean), (1,), generator=generator))
        options = self.prompts[i]
        prompt = options[int(torch.randint(len(options), (1,), generator=generator))]
        mean, std = self.mean, self.std
        # flip_p = 0 draws nothing, so runs without flips keep the random stream they always had.
        if self.flip_p > 0 and float(torch.rand((), generator=generator)) < self.flip_p:
            mean, std = self.flipped
        noise = torch.randn(mean[i : i + 1].shape, generator=generator)
        return mean[i : i + 1] + std[i : i + 1] * noise, prompt
