"""Textual-inversion embedding files: diffusers' layout and the A1111 / ComfyUI / kohya one, read and converted.

diffusers: `learned_embeds.safetensors` = {placeholder: (k, d)} for text encoder 1 and, for SDXL,
`learned_embeds_2.safetensors` for text encoder 2 (what `pipe.load_textual_inversion` reads, one file per encoder).
A1111 / ComfyUI / kohya: SDXL tokens are one file with `clip_l` (text encoder 1, 768 wide) and `clip_g` (text
encoder 2, 1280 wide); SD1.x/2.x ones are a single tensor, under the token's name or `emb_params`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoodip.errors import ZoodipError
from zoodip.io import atomic_write

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
SDXL_FILE = "learned_embeds_sdxl.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_pickled_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A diffusers `.bin` ({token: tensor}) or an A1111 `.pt` ({"string_to_param": {"*": tensor}, ...}) embedding,
    read with torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ZoodipError(f"{path} could not be read by torch.load(weights_only=True) ({type(err).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        obj = {str(obj.get("name", "*")): next(iter(obj["string_to_param"].values()))}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ZoodipError(f"{path} holds no {{token: tensor}} embedding (diffusers .bin or A1111 .pt)")
    return {str(k): v for k, v in obj.items()}


def read_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or one sentence saying why it cannot be read. A pickle file (.pt, .bin)
    is refused, since unpickling can run code, unless `allow_pickle`: then only tensors are read (weights_only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZoodipError(f"embedding file {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ZoodipError(
                f"{path} is a pickle file, and loading one can run code: convert it to .safetensors, or pass "
                "allow_pickle=true (data.allow_pickle for data.init_embedding) to read its tensors with weights_only"
            )
        return read_pickled_tensors(path)
    try:
        return load_file(str(path))
    except Exception as err:
        raise ZoodipError(f"{path} is not a readable safetensors file ({type(err).__name__})") from None


def as_rows(tensor: torch.Tensor, path: Path, key: str) -> torch.Tensor:
    """A token tensor as (k, d) fp32 rows; (d,) is one row."""
    if tensor.ndim not in (1, 2) or tensor.numel() == 0:
        raise ZoodipError(f"{path} key {key!r} has shape {tuple(tensor.shape)}; a token is (d,) or (k, d)")
    return tensor.reshape(-1, tensor.shape[-1]).float()


def layout(tensors: dict[str, torch.Tensor]) -> str:
    """'sdxl' (clip_l + clip_g), 'single' (one tensor: diffusers' {token: rows} or A1111's emb_params), else error."""
    if set(tensors) == set(SDXL_KEYS):
        return "sdxl"
    if len(tensors) == 1:
        return "single"
    raise ZoodipError(
        f"unknown embedding layout with keys {sorted(tensors)}: expected one tensor {{token: (k, d)}} (diffusers) "
        f"or clip_l and clip_g (A1111 / ComfyUI SDXL)"
    )


def second_file(path: Path) -> Path:
    """The diffusers file of text encoder 2 beside `path`: learned_embeds_2.safetensors, or <stem>_2.safetensors."""
    return path.with_name(f"{path.stem}_2{path.suffix}")


def load_embedding(path: str | Path, allow_pickle: bool = False) -> tuple[str | None, list[torch.Tensor]]:
    """(token name or None, rows per text encoder) from a diffusers file (plus its `_2` sibling, when there is one)
    or an A1111 SDXL file. A run folder reads its learned_embeds.safetensors."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_FILES[0]
    tensors = read_tensors(path, allow_pickle)
    if layout(tensors) == "sdxl":
        return None, [as_rows(tensors[k], path, k) for k in SDXL_KEYS]
    ((key, value),) = tensors.items()
    rows = [as_rows(value, path, key)]
    sibling = second_file(path)
    if sibling.is_file():
        other = read_tensors(sibling)
        if layout(other) != "single":
            raise ZoodipError(f"{sibling} must hold one tensor for text encoder 2, got keys {sorted(other)}")
        ((key2, value2),) = other.items()
        if key2 != key:
            raise ZoodipError(f"{path} holds token {key!r} but {sibling} holds {key2!r}; they must be one token")
        rows.append(as_rows(value2, sibling, key2))
    token = None if key == "emb_params" else key
    return token, rows


def load_init_embedding(path: str | Path, expected_widths: list[int], allow_pickle: bool = False) -> list[torch.Tensor]:
    """`data.init_embedding`: the rows per text encoder of a diffusers or A1111 file, checked against the model's
    token widths (768 for SD1.5, 1024 SD2.1, [768, 1280] SDXL, 256 the toy world)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ZoodipError(f"data.init_embedding={str(path)!r} does not exist; give a .safetensors embedding file")
    _, rows = load_embedding(path, allow_pickle)
    widths = [r.shape[-1] for r in rows]
    if len(rows) != len(expected_widths):
        hint = " (SDXL: learned_embeds_2.safetensors beside it, or one clip_l/clip_g file)" if len(rows) == 1 else ""
        raise ZoodipError(
            f"data.init_embedding={str(path)!r} holds a token for {len(rows)} text encoder(s), widths {widths}, but "
            f"the model has {len(expected_widths)}, widths {list(expected_widths)}{hint}"
        )
    if widths != list(expected_widths):
        raise ZoodipError(
            f"data.init_embedding={str(path)!r} has token width {widths}, but the model's text encoder(s) take "
            f"{list(expected_widths)}: it was learned for another model"
        )
    return rows


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def write_sdxl_file(rows: list[torch.Tensor], path: str | Path) -> Path:
    """One A1111 / ComfyUI / kohya SDXL file: {clip_l: text encoder 1 rows, clip_g: text encoder 2 rows}."""
    if len(rows) != 2:
        raise ZoodipError(f"an SDXL embedding has a token for 2 text encoders, got {len(rows)}")
    return _save(Path(path), dict(zip(SDXL_KEYS, rows, strict=True)))


def write_diffusers_files(token: str, rows: list[torch.Tensor], folder: str | Path) -> list[Path]:
    """diffusers' layout: learned_embeds.safetensors (and learned_embeds_2.safetensors) = {token: rows}."""
    folder = Path(folder)
    return [_save(folder / name, {token: r}) for name, r in zip(DIFFUSERS_FILES, rows, strict=False)]


def write_run_sdxl_embedding(run_dir: str | Path) -> Path | None:
    """After training: <run>/learned_embeds_sdxl.safetensors from the run's two diffusers files (SDXL runs only;
    None for a single-encoder run)."""
    run_dir = Path(run_dir)
    if not (run_dir / DIFFUSERS_FILES[1]).is_file():
        return None
    _, rows = load_embedding(run_dir / DIFFUSERS_FILES[0])
    return write_sdxl_file(rows, run_dir / SDXL_FILE)
