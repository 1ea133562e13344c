"""zoodip-demo (`make demo`): personalize one toy-world subject with ZOODiP on a CPU, evaluate it, draw demo.png.

    zoodip-demo [key=value ...]    # the composition of `zoodip-train experiments=demo`, same overrides

Trains the token (experiments/demo.yaml: the paper's ZOODiP on the shipped toy world), evaluates it with
eval=toyworld, evaluates the initializer word the same way (the "before"), and writes `<run>/demo.png`: the
reference images, images of the initializer word, images of the learned token, and the learned token
"on a blue background".
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import evaluate_toyworld, prepare_config, reference_images
from zoodip.runtime.train import run
from zoodip.toyworld import world as toyworld

log = logging.getLogger("zoodip.toyworld.demo")


def initializer_embedding(model_dir: str | Path, word: str) -> torch.Tensor:
    """The (1, d) row of `word` in the world's text-encoder table: the token before any training."""
    from safetensors import safe_open

    tokenizer = toyworld.world_tokenizer()
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ZoodipError(f"data.initializer_token={word!r} is not one token of the toy world's vocabulary")
    with safe_open(str(Path(model_dir) / "text_encoder" / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("token_embedding.weight"))  # noqa: SIM118 (no __iter__)
        return f.get_tensor(key)[ids[0]][None].float()


def demo_picture(
    run_dir: Path, subject: str, references: list[Image.Image], before: Path, after: Path, size: int = 96
) -> Path:
    """demo.png: four labelled rows of five images (references, initializer, learned, learned on blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def images(folder: Path, prompt: int) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in sorted((folder / "images").glob(f"p{prompt:02d}_*.png"))[:5]]

    prompts, backgrounds = zip(*toyworld.evaluation_prompts("<tok>", subject), strict=True)
    blue = backgrounds.index("blue") if "blue" in backgrounds else backgrounds.index("gray")
    rows = [
        ("reference images", references[:5]),
        ("initializer word: 'a photo of <tok>'", images(before, 0)),
        ("learned token: 'a photo of <tok>'", images(after, 0)),
        (f"learned token: '{prompts[blue]}'", images(after, blue)),
    ]
    fig, axes = plt.subplots(len(rows), 5, figsize=(7.5, 1.9 * len(rows)))
    for r, (label, row) in enumerate(rows):
        for c in range(5):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c].resize((size, size), Image.NEAREST))
        axes[r][0].set_title(label, loc="left", fontsize=10, pad=4)
    fig.tight_layout()
    out = run_dir / "demo.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def demo(cfg: DictConfig, run_dir: Path) -> dict:
    """Train, evaluate before and after, draw the picture; returns the two evaluations' metrics."""
    metrics = run(cfg, run_dir)
    if metrics.get("status") != "completed":
        raise RuntimeError(f"training did not complete: {metrics.get('error')}")
    eval_cfg = prepare_config(cfg)
    after = evaluate_toyworld(run_dir, eval_cfg)
    before_dir = run_dir / "initializer"
    before_dir.mkdir(exist_ok=True)
    word = cfg.data.initializer_token
    before = evaluate_toyworld(before_dir, eval_cfg, embeddings=[initializer_embedding(cfg.model.path, word)])
    picture = demo_picture(
        run_dir, cfg.data.subject, reference_images(cfg.data.path), before_dir / "eval", run_dir / "eval"
    )
    print(
        f"\nzoodip demo: subject {cfg.data.subject}, initializer '{word}', {metrics['steps']} ZOODiP steps in "
        f"{metrics['wall_seconds']:.0f} s\n"
        f"  subject_accuracy  before {before['subject_accuracy']:.2f}  after {after['subject_accuracy']:.2f}\n"
        f"  prompt_accuracy   before {before['prompt_accuracy']:.2f}  after {after['prompt_accuracy']:.2f}\n"
        f"  picture:   {picture}\n  token:     {run_dir / 'learned_embeds.safetensors'}\n"
        f"  metrics:   {run_dir / 'metrics.json'}, {run_dir / 'eval' / 'metrics.json'}\n"
        f"  images:    {run_dir / 'eval' / 'images'}",
        file=sys.stderr,
    )
    return {"before": before, "after": after}


def demo_task(cfg: DictConfig) -> None:
    demo(cfg, Path(HydraConfig.get().runtime.output_dir))


hydra_main = hydra_app("train", demo_task)


def main() -> None:
    if not any(a.startswith("experiments=") for a in sys.argv[1:]):
        sys.argv.insert(1, "experiments=demo")
    hydra_main()


if __name__ == "__main__":
    main()
