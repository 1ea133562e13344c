"""The real CLIP BPE tokenizer, built offline from the vocabulary that open-clip-torch ships."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 48894  # lines 1..48894 of bpe_simple_vocab_16e6.txt.gz (line 0 is a header)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_file() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable characters, one per byte, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-token vocabulary and its BPE merges, exactly as OpenAI's simple_tokenizer builds them."""
    with gzip.open(_bpe_file()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(
    directory: str | Path, vocab: dict[str, int], merges: list[str], pad_token: str = EOS, max_length: int = 77
) -> Path:
    """Write vocab.json / merges.txt / tokenizer configs that `CLIPTokenizer.from_pretrained(directory)` reads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


def write_clip_tokenizer(directory: str | Path, pad_token: str = EOS) -> Path:
    """CLIP's own tokenizer files (SD1.5 pads with `<|endoftext|>`; SD2.x and SDXL's second tokenizer pad
    with "!", id 0)."""
    vocab, merges = clip_vocab_and_merges()
    return write_tokenizer(directory, vocab, merges, pad_token=pad_token)


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A fresh CLIPTokenizer (full vocabulary, model_max_length=77) with no network access."""
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, pad_token=pad_token))


def _cache_dir() -> Path:
    root = os.environ.get("ZOODIP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "zoodip")
    return Path(root).expanduser()


def cached_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """`clip_tokenizer`, saved once under $ZOODIP_CACHE (default ~/.cache/zoodip) so later loads take <1 s."""
    target = _cache_dir() / f"clip-tokenizer-pad{ord(pad_token[0])}"
    if not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".clip-tokenizer-", dir=target.parent))
        clip_tokenizer(pad_token).save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(target)
