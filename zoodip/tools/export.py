"""zoodip-export: an SDXL token between diffusers' layout (two files) and A1111 / ComfyUI / kohya's (one file).

zoodip-export input=outputs/runs/<date>/<time>                  # -> <run>/learned_embeds_sdxl.safetensors
zoodip-export input=my_token.safetensors output=DIR token=<my>  # A1111 -> DIR/learned_embeds(_2).safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.models.embeddings import (
    DIFFUSERS_FILES,
    SDXL_FILE,
    layout,
    load_embedding,
    read_tensors,
    write_diffusers_files,
    write_sdxl_file,
)

TARGETS = ("auto", "a1111", "diffusers")


def source_file(path: str) -> Path:
    """The embedding file named by `input`: the file itself, or a run folder's learned_embeds.safetensors."""
    source = Path(path).expanduser()
    if source.is_dir():
        source = source / DIFFUSERS_FILES[0]
    if not source.is_file():
        raise ZoodipError(f"input={path!r} is neither an embedding file nor a run folder with {DIFFUSERS_FILES[0]}")
    return source


def refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ZoodipError(f"{', '.join(existing)} already exist(s); choose another output= (nothing was written)")


def export(input_path: str, to: str = "auto", output: str | None = None, token: str | None = None) -> list[Path]:
    """Convert `input_path` to the other layout (or `to`); returns the files written."""
    if to not in TARGETS:
        raise ZoodipError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    source = source_file(input_path)
    is_sdxl_file = layout(read_tensors(source)) == "sdxl"
    target = to if to != "auto" else ("diffusers" if is_sdxl_file else "a1111")
    name, rows = load_embedding(source)
    if target == "a1111":
        if len(rows) != 2:
            raise ZoodipError(
                f"{source} is a single-encoder token: it loads in A1111 / ComfyUI as it is; only SDXL tokens "
                f"(with {DIFFUSERS_FILES[1]} beside them) need converting"
            )
        path = Path(output).expanduser() if output else source.with_name(SDXL_FILE)
        refuse_existing([path])
        return [write_sdxl_file(rows, path)]
    folder = Path(output).expanduser() if output else source.parent
    refuse_existing([folder / f for f in DIFFUSERS_FILES[: len(rows)]])
    return write_diffusers_files(token or name or f"<{source.stem}>", rows, folder)


def task(cfg: DictConfig) -> None:
    written = export(str(cfg.input), str(cfg.to), cfg.output, cfg.token)
    print(f"zoodip-export: wrote {', '.join(str(p) for p in written)}", file=sys.stderr)


main = hydra_app("export", task)

if __name__ == "__main__":
    main()
