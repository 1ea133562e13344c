"""The toy world: coloured shapes on plain backgrounds, their captions, a small-vocabulary tokenizer and the
scorer that judges generated images (the world's CLIP / DINO).

Every image is drawn from (shape, colour, background) plus jitter of position, size, rotation and shade, by a
seeded numpy generator, so a seed gives the same pixels on every machine. Captions name some or all of the three
attributes with words that are each one token of the world's tokenizer (`world_tokenizer`), and use the generic
words "object", "shape" and "thing" when they leave the shape out, so a generic initializer has a trained meaning.
`zoodip-make-toyworld` (zoodip/toyworld/make.py) trains a diffusers-shaped text-to-image model on this world.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from zoodip.errors import ZoodipError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 215, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
}
BACKGROUNDS = ("gray", *COLOURS)
BACKGROUND_RGB = {"gray": (128, 128, 128), **COLOURS}
GENERIC = ("object", "shape", "thing")
#: Every word a caption or an evaluation prompt uses; each is one token of `world_tokenizer`.
WORDS = ("a", "an", "photo", "of", "on", "background", *SHAPES, *COLOURS, "gray", *GENERIC)
IMAGE_SIZE = 32
MAX_LENGTH = 20  # tokenizer.model_max_length: the longest caption is 11 tokens with BOS/EOS
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What one image shows; the scorer's three labels."""

    shape: str
    colour: str
    background: str


def parse_subject(subject: str) -> Scene:
    """`orange_cross` -> Scene(cross, orange, gray): a toy-world subject is `<colour>_<shape>`."""
    colour, _, shape = str(subject).partition("_")
    if colour not in COLOURS or shape not in SHAPES:
        raise ZoodipError(
            f"data.subject={subject!r} is not a toy-world subject: use <colour>_<shape> with a colour of "
            f"{', '.join(COLOURS)} and a shape of {', '.join(SHAPES)} (e.g. orange_cross)"
        )
    return Scene(shape, colour, "gray")


# ---------------------------------------------------------------------------------------------------------------
# drawing


def _outline(shape: str) -> np.ndarray:
    """The shape's polygon, centred at 0 with radius about 1 (y grows downwards)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        s = 0.8
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a) + 0.15], 1)
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a) + 0.05], 1)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, -y - 2.5], 1) / 16.5
    if shape == "cross":
        w, l = 0.3, 0.9
        return np.array(
            [[-w, -l], [w, -l], [w, -w], [l, -w], [l, w], [w, w], [w, l], [-w, l], [-w, w], [-l, w], [-l, -w], [-w, -w]]
        )
    raise ZoodipError(f"unknown shape {shape!r}")


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c * factor), 0, 255)) for c in rgb)  # type: ignore[return-value]


def draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """One 32x32 RGB image of `scene`, with position, size, rotation and shade drawn from `rng`."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    background = _shade(BACKGROUND_RGB[scene.background], rng.uniform(0.85, 1.1))
    image = Image.new("RGB", (big, big), background)
    radius = rng.uniform(0.30, 0.40) * big
    margin = big / 2 - radius - 0.04 * big
    centre = big / 2 + rng.uniform(-margin, margin, size=2)
    angle = np.deg2rad(rng.uniform(-25, 25))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = _outline(scene.shape) @ rotation.T * radius + centre
    fill = _shade(COLOURS[scene.colour], rng.uniform(0.8, 1.1))
    ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def random_scene(rng: np.random.Generator) -> Scene:
    """Uniform shape and colour, and a background that differs from the colour (gray one time in three)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    others = [b for b in BACKGROUNDS if b != colour and b != "gray"]
    background = "gray" if rng.random() < 1 / 3 else others[rng.integers(len(others))]
    return Scene(shape, colour, background)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption naming all, some or (rarely) none of the scene's attributes.

    The shape is left out one time in five (a generic word stands in), the colour one time in five, the
    background one time in three; "a photo of" starts half of them.
    """
    noun = GENERIC[rng.integers(len(GENERIC))] if rng.random() < 0.2 else scene.shape
    described = noun if rng.random() < 0.2 else f"{scene.colour} {noun}"
    text = f"{article(described)} {described}"
    if rng.random() >= 1 / 3:
        text += f" on {article(scene.background)} {scene.background} background"
    return f"a photo of {text}" if rng.random() < 0.5 else text


def true_words(subject: str) -> str:
    """The words a subject's token stands for, as the world's captions say them: "a red circle"."""
    scene = parse_subject(subject)
    described = f"{scene.colour} {scene.shape}"
    return f"{article(described)} {described}"


def full_caption(scene: Scene) -> str:
    """The caption that names everything, as the acceptance check prompts it."""
    described = f"{scene.colour} {scene.shape}"
    return f"{article(described)} {described} on {article(scene.background)} {scene.background} background"


def sample_world(count: int, seed: int) -> tuple[np.ndarray, list[Scene], list[str]]:
    """`count` images (uint8, N x 32 x 32 x 3), their scenes and captions, from one seeded generator."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    scenes, captions = [], []
    for i in range(count):
        scene = random_scene(rng)
        images[i] = np.asarray(draw(scene, rng))
        scenes.append(scene)
        captions.append(caption(scene, rng))
    return images, scenes, captions


def subject_images(subject: str, count: int = 5, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """`count` reference images of a subject, as a DreamBooth folder holds them: the subject on varied
    backgrounds, with a comprehensive caption for each ('{}' is the placeholder)."""
    scene = parse_subject(subject)
    rng = np.random.default_rng([seed, SHAPES.index(scene.shape), list(COLOURS).index(scene.colour)])
    backgrounds = [b for b in BACKGROUNDS if b != scene.colour]
    images, captions = [], []
    for i in range(count):
        background = backgrounds[(i + int(rng.integers(len(backgrounds)))) % len(backgrounds)] if i else "gray"
        images.append(draw(Scene(scene.shape, scene.colour, background), rng))
        captions.append(f"a photo of {{}} on {article(background)} {background} background")
    return images, captions


def write_subjects(directory: Path, subjects: list[str], count: int = 5, seed: int = 0) -> Path:
    """DreamBooth layout `directory/<subject>/NN.png` and DCO-style `directory/captions.json`."""
    table: dict[str, dict[str, str]] = {}
    for subject in subjects:
        images, captions = subject_images(subject, count, seed)
        folder = directory / subject
        folder.mkdir(parents=True, exist_ok=True)
        table[subject] = {}
        for i, (image, text) in enumerate(zip(images, captions, strict=True)):
            image.save(folder / f"{i:02d}.png")
            table[subject][f"{i:02d}.png"] = text
    (directory / "captions.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def world_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary: the 512 byte symbols, the merges that BPE training learns on the
    world's words (so each word is one token) and BOS / EOS, about 600 rows instead of CLIP's 49,408."""
    from collections import Counter

    from zoodip.models.tokenizer import BOS, EOS, bytes_to_unicode

    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS]
    merges: list[str] = []
    while any(len(w) > 1 for w in words):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:], strict=False))
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken alphabetically
        merges.append(" ".join(best))
        tokens.append("".join(best))
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def world_tokenizer():
    """The world's CLIPTokenizer (model_max_length 20), built offline."""
    import tempfile

    from transformers import CLIPTokenizer

    from zoodip.models.tokenizer import write_tokenizer

    vocab, merges = world_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tokenizer(tmp, vocab, merges, max_length=MAX_LENGTH))


# ---------------------------------------------------------------------------------------------------------------
# scorer


class Scorer(torch.nn.Module):
    """A small CNN that reads a 32x32 image: logits for shape, colour and background, and a feature vector
    (the world's CLIP-I / DINO embedding). Input in [-1, 1], N x 3 x 32 x 32."""

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width

        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.SiLU()]

        self.body = torch.nn.Sequential(
            *block(3, w),
            *block(w, w),
            torch.nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            torch.nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * w, feature_dim),
            torch.nn.SiLU(),
        )
        self.shape = torch.nn.Linear(feature_dim, len(SHAPES))
        self.colour = torch.nn.Linear(feature_dim, len(COLOURS))
        self.background = torch.nn.Linear(feature_dim, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {
            "features": features,
            "shape": self.shape(features),
            "colour": self.colour(features),
            "background": self.background(features),
        }

    @torch.no_grad()
    def judge(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted shape / colour / background indices and L2-normalised features for PIL images or a tensor."""
        self.eval()
        x = images if isinstance(images, torch.Tensor) else pil_to_tensor(images)
        outs = [self(chunk) for chunk in x.split(batch_size)]
        return {
            "shape": torch.cat([o["shape"].argmax(1) for o in outs]),
            "colour": torch.cat([o["colour"].argmax(1) for o in outs]),
            "background": torch.cat([o["background"].argmax(1) for o in outs]),
            "features": F.normalize(torch.cat([o["features"] for o in outs]), dim=-1),
        }


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> N x 3 x 32 x 32 in [-1, 1] (resized to 32 when they are not), as `data.to_tensor` reads one."""
    from zoodip.data.dataset import to_tensor

    return torch.stack([to_tensor(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)) for im in images])


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "colour": torch.tensor([list(COLOURS).index(s.colour) for s in scenes]),
        "background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
    }


SCORER_FILE = "scorer.safetensors"


def save_scorer(scorer: Scorer, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(directory / SCORER_FILE))
    (directory / "config.json").write_text(json.dumps(scorer.config) + "\n")


def load_scorer(directory: str | Path) -> Scorer:
    """The scorer saved by `zoodip-make-toyworld` in `<world>/scorer/`."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    if not (directory / SCORER_FILE).is_file():
        raise ZoodipError(f"{directory} holds no toy-world scorer ({SCORER_FILE}); run zoodip-make-toyworld")
    scorer = Scorer(**json.loads((directory / "config.json").read_text()))
    scorer.load_state_dict({k: v.float() for k, v in load_file(str(directory / SCORER_FILE)).items()})
    return scorer.eval()


def cosine_to_words(table: torch.Tensor, tokenizer, word: str, others: list[str]) -> dict[str, float]:
    """Cosine similarity of one word's embedding row with each of `others` (how far an initializer sits)."""
    row = table[tokenizer.convert_tokens_to_ids(word + "</w>")]
    return {
        o: float(F.cosine_similarity(row, table[tokenizer.convert_tokens_to_ids(o + "</w>")], dim=0)) for o in others
    }


# ---------------------------------------------------------------------------------------------------------------
# evaluation (eval=toyworld): the DreamBooth protocol with the scorer as CLIP / DINO


def evaluation_prompts(placeholder: str, subject: str) -> list[tuple[str, str | None]]:
    """(prompt, requested background or None): "a photo of <tok>", then "<tok> on a <bg> background" for every
    background but the subject's own colour (on which the subject would be invisible)."""
    scene = parse_subject(subject)
    prompts: list[tuple[str, str | None]] = [(f"a photo of {placeholder}", None)]
    for background in BACKGROUNDS:
        if background != scene.colour:
            prompts.append((f"{placeholder} on {article(background)} {background} background", background))
    return prompts


def score_images(
    scorer: Scorer,
    images: list[Image.Image],
    references: list[Image.Image],
    subject: str,
    backgrounds: list[str | None],
    diversity_rows: list[int],
) -> tuple[dict[str, list], dict[str, float | None]]:
    """Per-image scores and their means for images generated from a learned token of `subject`.

    subject_accuracy: the scorer reads the subject's shape and colour (both); prompt_accuracy: it reads the
    background the prompt asked for (over prompts that ask for one: the CLIP-T analogue); image_similarity: mean
    scorer-feature cosine with the reference images (the CLIP-I / DINO analogue); diversity: one minus the mean
    pairwise feature cosine of the images at `diversity_rows` (the complement of DINO_inter).
    """
    scene = parse_subject(subject)
    pred, refs = scorer.judge(images), scorer.judge(references)
    shape_ok = pred["shape"] == SHAPES.index(scene.shape)
    colour_ok = pred["colour"] == list(COLOURS).index(scene.colour)
    wanted = torch.tensor([BACKGROUNDS.index(b) if b else -1 for b in backgrounds])
    similarity = (pred["features"] @ refs["features"].T).mean(1)
    rows = {
        "shape": [SHAPES[i] for i in pred["shape"]],
        "colour": [list(COLOURS)[i] for i in pred["colour"]],
        "background": [BACKGROUNDS[i] for i in pred["background"]],
        "requested_background": backgrounds,
        "subject_correct": (shape_ok & colour_ok).tolist(),
        "shape_correct": shape_ok.tolist(),
        "colour_correct": colour_ok.tolist(),
        "prompt_correct": [bool(p == w) if w >= 0 else None for p, w in zip(pred["background"], wanted, strict=True)],
        "image_similarity": similarity.tolist(),
    }
    asked = wanted >= 0
    feats = pred["features"][diversity_rows]
    n = len(feats)
    pair_mean = float(((feats @ feats.T).sum() - n) / (n * (n - 1))) if n >= 2 else None
    metrics = {
        "subject_accuracy": float((shape_ok & colour_ok).float().mean()),
        "shape_accuracy": float(shape_ok.float().mean()),
        "colour_accuracy": float(colour_ok.float().mean()),
        "prompt_accuracy": float((pred["background"][asked] == wanted[asked]).float().mean()) if asked.any() else None,
        "image_similarity": float(similarity.mean()),
        "diversity": None if pair_mean is None else 1.0 - pair_mean,
    }
    return rows, metrics
