"""Interoperability: SDXL tokens round-trip between diffusers' two files and the A1111 / ComfyUI clip_l/clip_g file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoodip.errors import ZoodipError
from zoodip.models.embeddings import SDXL_FILE, load_embedding, load_init_embedding, write_run_sdxl_embedding
from zoodip.tools.export import export


def sdxl_run(folder: Path, token: str = "<dog6>") -> tuple[torch.Tensor, torch.Tensor]:
    """A run folder as zoodip-train leaves it for SDXL: one diffusers file per text encoder."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(2, 768, generator=g), torch.randn(2, 1280, generator=g)
    save_file({token: clip_l}, str(folder / "learned_embeds.safetensors"))
    save_file({token: clip_g}, str(folder / "learned_embeds_2.safetensors"))
    return clip_l, clip_g


def test_sdxl_single_file_round_trips_tensor_for_tensor(tmp_path):
    clip_l, clip_g = sdxl_run(tmp_path / "run")
    single = write_run_sdxl_embedding(tmp_path / "run")
    assert single == tmp_path / "run" / SDXL_FILE
    tensors = load_file(str(single))
    assert sorted(tensors) == ["clip_g", "clip_l"]
    assert torch.equal(tensors["clip_l"], clip_l) and torch.equal(tensors["clip_g"], clip_g)

    back = export(str(single), output=str(tmp_path / "back"), token="<dog6>")
    assert [p.name for p in back] == ["learned_embeds.safetensors", "learned_embeds_2.safetensors"]
    first, second = load_file(str(back[0])), load_file(str(back[1]))
    assert torch.equal(first["<dog6>"], clip_l) and torch.equal(second["<dog6>"], clip_g)
    token, rows = load_embedding(back[0])  # reads the _2 file beside it
    assert token == "<dog6>" and torch.equal(rows[0], clip_l) and torch.equal(rows[1], clip_g)

    again = export(str(tmp_path / "back"), output=str(tmp_path / "again.safetensors"))  # a folder: its diffusers files
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(again[0])).values(), tensors.values(), strict=True))


def test_single_encoder_run_writes_no_sdxl_file(tmp_path):
    save_file({"<t>": torch.zeros(1, 256)}, str(tmp_path / "learned_embeds.safetensors"))
    assert write_run_sdxl_embedding(tmp_path) is None
    with pytest.raises(ZoodipError, match="loads in A1111"):
        export(str(tmp_path))


def test_export_never_overwrites(tmp_path):
    sdxl_run(tmp_path)
    export(str(tmp_path))
    with pytest.raises(ZoodipError, match="already exist"):
        export(str(tmp_path))


def test_init_embedding_checks_width_layout_and_existence(tmp_path):
    clip_l, clip_g = sdxl_run(tmp_path)
    rows = load_init_embedding(tmp_path / "learned_embeds.safetensors", [768, 1280])
    assert torch.equal(rows[0], clip_l) and torch.equal(rows[1], clip_g)
    single = write_run_sdxl_embedding(tmp_path)
    assert torch.equal(load_init_embedding(single, [768, 1280])[1], clip_g)
    with pytest.raises(ZoodipError, match=r"token width \[768, 1280\].*\[1024, 1280\]"):
        load_init_embedding(single, [1024, 1280])
    with pytest.raises(ZoodipError, match="2 text encoder"):
        load_init_embedding(single, [768])
    with pytest.raises(ZoodipError, match="does not exist"):
        load_init_embedding(tmp_path / "missing.safetensors", [768])
    save_file({"a": torch.zeros(3), "b": torch.zeros(3)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ZoodipError, match="unknown embedding layout"):
        load_init_embedding(tmp_path / "two.safetensors", [3])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ZoodipError, match="not a readable safetensors"):
        load_init_embedding(tmp_path / "junk.safetensors", [3])


def test_export_command_line(tmp_path):
    sdxl_run(tmp_path / "run")
    cmd = [sys.executable, "-m", "zoodip.tools.export"]
    ok = subprocess.run([*cmd, f"input={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "run" / SDXL_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    bad = subprocess.run([*cmd, f"input={tmp_path / 'nope'}"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: input=")
    unknown = subprocess.run([*cmd, "inptu=x"], capture_output=True, text=True, cwd=tmp_path)
    assert unknown.returncode == 2
