"""Evaluation scores (paper S1.2, S3.3), the DreamBooth prompt tables (Tables S2/S3) and the scoring backbones."""

import math
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zoodip.data.prompts import (
    LIVING_PROMPTS,
    OBJECT_PROMPTS,
    eval_prompts,
    load_subjects,
    subject_info,
    text_prompts,
)
from zoodip.errors import ZoodipError
from zoodip.evaluation.scoring import (
    ClipScorer,
    DinoScorer,
    clip_i,
    clip_i_per_image,
    clip_t,
    cosine_matrix,
    dino,
    dino_inter,
    dino_per_image,
    write_tiny_eval_models,
)

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

# ---------------------------------------------------------------------------------------------------------------
# metric math


def test_cosine_matrix_by_hand():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 0.0], [-1.0, -1.0]])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 1.0, -r], [r, r, -1.0]])
    assert torch.allclose(cosine_matrix(a, b), expected, atol=1e-6)


def test_identical_embeddings_score_one():
    v = torch.tensor([0.3, -1.2, 2.0, 0.5])
    ref, gen = v.repeat(3, 1), 2.5 * v.repeat(4, 1)  # cosine ignores the scale
    assert clip_i(ref, gen) == pytest.approx(1.0, abs=1e-6)
    assert dino(ref, gen) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(clip_i_per_image(ref, gen), torch.ones(4), atol=1e-6)


def test_orthogonal_embeddings_score_zero():
    ref, gen = E1.repeat(2, 1), E2.repeat(3, 1)
    assert clip_i(ref, gen) == pytest.approx(0.0, abs=1e-7)
    assert dino(ref, gen) == pytest.approx(0.0, abs=1e-7)


def test_clip_i_is_the_mean_over_all_pairs():
    ref = torch.stack([E1, E2])
    gen = torch.stack([E1, E1 + E2])
    r = 1 / math.sqrt(2)
    # pairs: (gen0, ref0)=1, (gen0, ref1)=0, (gen1, ref0)=r, (gen1, ref1)=r
    assert clip_i(ref, gen) == pytest.approx((1 + 0 + r + r) / 4, abs=1e-6)
    assert dino(ref, gen) == pytest.approx((1 + 0 + r + r) / 4, abs=1e-6)
    assert torch.allclose(clip_i_per_image(ref, gen), torch.tensor([0.5, r]), atol=1e-6)
    assert torch.allclose(dino_per_image(ref, gen), torch.tensor([0.5, r]), atol=1e-6)


def test_dino_inter_over_distinct_pairs():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert dino_inter(v.repeat(5, 1)) == pytest.approx(1.0, abs=1e-6)
    assert dino_inter(torch.stack([E1, E2])) == pytest.approx(0.0, abs=1e-7)
    # e1, e2, e1+e2: pairs 0, r, r -- the diagonal (self-similarity 1) is left out
    r = 1 / math.sqrt(2)
    assert dino_inter(torch.stack([E1, E2, E1 + E2])) == pytest.approx(2 * r / 3, abs=1e-6)
    with pytest.raises(ZoodipError, match="at least 2"):
        dino_inter(E1[None])


def test_clip_t_pairs_rows():
    text = torch.stack([E1, E2])
    assert torch.allclose(clip_t(text, torch.stack([E1, E2])), torch.ones(2), atol=1e-6)
    assert torch.allclose(clip_t(text, torch.stack([E2, E1])), torch.zeros(2), atol=1e-7)
    r = 1 / math.sqrt(2)
    assert torch.allclose(clip_t(text, torch.stack([E1 + E2, E2])), torch.tensor([r, 1.0]), atol=1e-6)
    with pytest.raises(ZoodipError, match="one text embedding per image"):
        clip_t(text, torch.stack([E1, E2, E1]))


def test_metrics_reject_bad_shapes():
    with pytest.raises(ZoodipError):
        cosine_matrix(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ZoodipError):
        clip_i(torch.ones(0, 3), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# prompts and subjects


def test_prompt_tables_match_the_paper():
    for table in (LIVING_PROMPTS, OBJECT_PROMPTS):
        assert len(table) == 25 and len(set(table)) == 25
        assert all("{0} {1}" in t for t in table)
        assert table[0] == "a {0} {1} in the jungle" and table[-1] == "a cube shaped {0} {1}"
    assert LIVING_PROMPTS[13] == "a {0} {1} wearing a black top hat and a monocle"  # Table S2, row 14
    assert OBJECT_PROMPTS[12] == "a {0} {1} with the Eiffel Tower in the background"  # Table S3, row 13
    assert LIVING_PROMPTS[:10] == OBJECT_PROMPTS[:10] and LIVING_PROMPTS[20:] == OBJECT_PROMPTS[20:]
    assert not set(LIVING_PROMPTS[10:20]) & set(OBJECT_PROMPTS[10:20])


def test_subject_table():
    df = load_subjects()
    assert list(df.columns) == ["subject", "class", "living", "initializer"]
    assert len(df) == 30 and int(df["living"].sum()) == 9  # S1.1: nine living subjects (dogs and cats)
    assert subject_info("dog6") == {"subject": "dog6", "class": "dog", "living": True, "initializer": "dog"}
    info = subject_info("shiny_sneaker")
    assert info["class"] == "sneaker" and info["living"] is False


def test_unknown_subject_lists_valid_names():
    with pytest.raises(ZoodipError, match="dog42") as err:
        subject_info("dog42")
    message = str(err.value)
    assert "backpack" in message and "\n" not in message


def test_eval_prompts_leave_out_the_class_noun():
    prompts = eval_prompts("<dog6>", "dog", living=True, use_class_token=False)
    assert len(prompts) == 25
    assert prompts[0] == "a <dog6> in the jungle"
    assert prompts[20] == "a red <dog6>"
    assert all("  " not in p and " dog " not in f"{p} " for p in prompts)
    with_class = eval_prompts("<dog6>", "dog", living=True, use_class_token=True)
    assert with_class[0] == "a <dog6> dog in the jungle" and with_class[24] == "a cube shaped <dog6> dog"


def test_eval_prompts_follow_the_living_flag():
    dog, teapot = subject_info("dog6"), subject_info("teapot")
    living = eval_prompts("<p>", dog["class"], dog["living"], use_class_token=False)
    objects = eval_prompts("<p>", teapot["class"], teapot["living"], use_class_token=False)
    assert "a <p> wearing a santa hat" in living and "a <p> wearing a santa hat" not in objects
    assert "a <p> with the Eiffel Tower in the background" in objects
    assert "a <p> with the Eiffel Tower in the background" not in living


def test_text_prompts_carry_the_class_noun_row_aligned():
    texts = text_prompts("stuffed animal", living=False)
    assert texts[0] == "a stuffed animal in the jungle" and len(texts) == 25
    prompts = eval_prompts("<bear>", "stuffed animal", living=False, use_class_token=False)
    assert [p.replace("<bear>", "stuffed animal") for p in prompts] == texts
    assert text_prompts("dog", living=True)[10] == "a dog wearing a red hat"


# ---------------------------------------------------------------------------------------------------------------
# backbones on tiny random weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_eval_models(tmp_path_factory.mktemp("eval-models"))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (40, 64), (32, 32), (70, 50), (36, 36)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 5], 3), dtype=np.uint8)) for i in range(n)]


def _check_image_embeddings(emb: torch.Tensor, n: int, dim: int) -> None:
    assert emb.shape == (n, dim) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(n), atol=1e-5)


def test_tiny_models_are_deterministic(tiny, tmp_path):
    again = write_tiny_eval_models(tmp_path)
    files = {"clip": "model.safetensors", "dinov2": "model.safetensors", "open_clip": "open_clip_model.safetensors"}
    for name, file in files.items():
        a, b = load_file(tiny[name] / file), load_file(again[name] / file)
        assert a.keys() == b.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_scorer_embeds_images_and_texts(tiny):
    images = _images(5)
    scorer = ClipScorer(path=tiny["clip"], batch_size=2)  # 3 batches
    emb = scorer.embed_images(images + [images[0].copy()])
    _check_image_embeddings(emb, 6, 32)
    sim = cosine_matrix(emb, emb)
    assert sim[0, 5] == pytest.approx(1.0, abs=1e-5)  # identical images
    assert sim[0, 1] < 0.999  # different images differ
    assert torch.allclose(ClipScorer(path=tiny["clip"], batch_size=32).embed_images(images), emb[:5], atol=1e-5)
    assert clip_i(emb[:2], emb[:2]) < 1 and clip_i(emb[:1], emb[5:]) == pytest.approx(1.0, abs=1e-5)

    texts = ["a dog in the jungle", "a red dog", "a dog with the Eiffel Tower in the background " * 3]
    temb = scorer.embed_texts(texts)
    _check_image_embeddings(temb, 3, 32)
    assert not torch.allclose(temb[0], temb[1], atol=1e-3)
    # padding a short prompt next to a long one must not change its embedding (attention mask, EOS pooling)
    assert torch.allclose(scorer.embed_texts(texts[:1]), temb[:1], atol=1e-5)
    assert clip_t(temb[:2], emb[:2]).shape == (2,)


def test_scorers_are_deterministic_across_loads(tiny):
    images = _images(3, seed=1)
    a, b = ClipScorer(path=tiny["clip"]), ClipScorer(path=str(tiny["clip"]))
    assert torch.equal(a.embed_images(images), b.embed_images(images))
    assert torch.equal(a.embed_texts(["a dog"]), b.embed_texts(["a dog"]))
    assert torch.equal(DinoScorer(tiny["dinov2"]).embed_images(images), DinoScorer(tiny["dinov2"]).embed_images(images))


def test_dino_scorer_embeds_cls_tokens(tiny):
    images = _images(4)
    scorer = DinoScorer(path=tiny["dinov2"], batch_size=3)
    emb = scorer.embed_images(images + [images[2].copy()])
    _check_image_embeddings(emb, 5, 32)
    assert cosine_matrix(emb, emb)[2, 4] == pytest.approx(1.0, abs=1e-5)
    assert dino_inter(emb[:4]) < 0.9999 and dino_inter(emb[[2, 4]]) == pytest.approx(1.0, abs=1e-5)
    pixels = scorer.processor(images=images[:1], return_tensors="pt").pixel_values
    assert pixels.shape[-2:] == (32, 32)  # resized and cropped to the tiny model's size
    with torch.no_grad():
        cls = scorer.model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(torch.nn.functional.normalize(cls, dim=-1), emb[:1], atol=1e-5)


def test_open_clip_backend_loads_a_local_dir(tiny):
    scorer = ClipScorer(backend="open_clip", open_clip_model=f"local-dir:{tiny['open_clip']}")
    images = _images(3)
    emb = scorer.embed_images(images + [images[1]])
    _check_image_embeddings(emb, 4, 32)
    assert cosine_matrix(emb, emb)[1, 3] == pytest.approx(1.0, abs=1e-5)
    _check_image_embeddings(scorer.embed_texts(["a dog", "a cat"]), 2, 32)


# ---------------------------------------------------------------------------------------------------------------
# missing weights: one clear line, fast


def _one_line_error(make, *needles: str) -> str:
    start = time.perf_counter()
    with pytest.raises(ZoodipError) as err:
        make()
    message = str(err.value)
    assert time.perf_counter() - start < 10, "an offline failure must not wait on the hub client's retries"
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def test_missing_local_folder(tmp_path):
    _one_line_error(lambda: ClipScorer(path=tmp_path / "nope" / "clip"), "eval.clip.path", "nope")
    _one_line_error(lambda: DinoScorer(path=tmp_path), "eval.dino.path", str(tmp_path))  # a folder without weights


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _one_line_error(lambda: ClipScorer("zoodip-test/no-such-clip"), "zoodip-test/no-such-clip", "eval.clip.path")
    assert "no network" in msg
    _one_line_error(lambda: DinoScorer("zoodip-test/no-such-dino"), "zoodip-test/no-such-dino", "eval.dino.path")
    _one_line_error(lambda: ClipScorer(backend="open_clip"), "ViT-B-32-quickgelu", "no network")


def test_bad_open_clip_settings():
    _one_line_error(lambda: ClipScorer(backend="nope"), "eval.clip.backend")
    _one_line_error(lambda: ClipScorer(backend="open_clip", open_clip_model="no-such-arch"), "no-such-arch")
    _one_line_error(lambda: ClipScorer(backend="open_clip", open_clip_pretrained="no-such-tag"), "no-such-tag")


def test_hub_ids_load_from_the_local_cache_offline(tiny, tmp_path):
    """The usual offline case: weights downloaded earlier sit in the HF cache under their hub id."""
    for repo, name in [("zoodip-test/clip", "clip"), ("zoodip-test/dino", "dinov2"), ("zoodip-test/oc", "open_clip")]:
        root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        shutil.copytree(tiny[name], root / "snapshots" / ("0" * 40))
    script = textwrap.dedent("""
        from zoodip.evaluation.scoring import ClipScorer, DinoScorer
        print(ClipScorer("zoodip-test/clip").embed_texts(["a dog"]).shape[-1])
        print(DinoScorer("zoodip-test/dino").model.config.hidden_size)
        print(ClipScorer(backend="open_clip", open_clip_model="hf-hub:zoodip-test/oc").embed_texts(["a dog"]).shape[-1])
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["32", "32", "32"]
