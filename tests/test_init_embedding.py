"""data.init_embedding: training starts from an existing token file; a wrong width is one clear sentence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import compose_train
from zoodip.errors import ZoodipError
from zoodip.models import load_components
from zoodip.objective import TextConditioner


def conditioner(num_vectors: int = 1) -> TextConditioner:
    parts = load_components("tiny", "random", None, torch.float32, torch.device("cpu"), "none")
    return TextConditioner(parts, "<sks>", "dog", num_vectors)


def test_config_key_exists_and_defaults_to_none():
    assert compose_train().data.init_embedding is None
    assert compose_train("data=planted").data.init_embedding is None


def test_initial_theta_starts_from_the_file(tmp_path):
    text = conditioner()
    rows = torch.randn(1, text.widths[0])
    save_file({"<other>": rows}, str(tmp_path / "tok.safetensors"))
    default = text.initial_theta()
    theta0 = text.initial_theta(str(tmp_path / "tok.safetensors"))
    assert torch.equal(theta0, rows.flatten()) and not torch.equal(theta0, default)
    assert torch.equal(text.embeddings[0].init_rows, rows)


def test_wrong_width_and_vector_count_are_clear_errors(tmp_path):
    text = conditioner()
    save_file({"<x>": torch.randn(1, text.widths[0] + 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ZoodipError, match="token width"):
        text.initial_theta(str(tmp_path / "wide.safetensors"))
    save_file({"<x>": torch.randn(3, text.widths[0])}, str(tmp_path / "three.safetensors"))
    with pytest.raises(ZoodipError, match="data.num_vectors=3"):
        text.initial_theta(str(tmp_path / "three.safetensors"))
