"""data.init_embedding: training starts from an existing token file; a wrong width is one clear sentence."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import compose_train
from zoodip.errors import ZoodipError
from zoodip.method.objective import TextConditioner
from zoodip.models.loading import load_components


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


def test_a_pickle_embedding_is_refused_unless_allowed_and_then_read_weights_only(tmp_path):
    """.pt / .bin files can run code when unpickled: refused with one sentence; with allow_pickle the tensors are
    read by torch.load(weights_only=True), in diffusers' .bin and A1111's .pt layouts, and an object that is not
    a tensor is refused even then."""
    import pickle

    from zoodip.models.embeddings import load_embedding

    torch.save({"<tok>": torch.ones(1, 768)}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_param": {"*": torch.full((1, 768), 2.0)}, "name": "tok"}, tmp_path / "a1111.pt")
    with pytest.raises(ZoodipError, match="is a pickle file, and loading one can run code"):
        load_embedding(tmp_path / "learned_embeds.bin")
    name, rows = load_embedding(tmp_path / "learned_embeds.bin", allow_pickle=True)
    assert name == "<tok>" and torch.equal(rows[0], torch.ones(1, 768))
    _, rows = load_embedding(tmp_path / "a1111.pt", allow_pickle=True)
    assert torch.equal(rows[0], torch.full((1, 768), 2.0))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"<tok>": Payload()}))
    with pytest.raises(ZoodipError, match="weights_only=True"):
        load_embedding(tmp_path / "evil.pt", allow_pickle=True)
