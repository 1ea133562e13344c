"""Pictures of a run: loss.png and the i*/tau histogram after training, grid.png (references beside generations)."""

from __future__ import annotations

import math

from PIL import Image

from zoodip.analysis.pictures import reference_grid, write_run_pictures
from zoodip.evaluation.evaluate import evaluate_run


class Recorder:
    """Stands in for zoodip.runtime.tracking.Tracker: records what would go to W&B."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, int]] = []

    def log_images(self, key, images, captions=None, step=None) -> None:
        self.logged.append((key, len(images)))


def history(steps: int) -> list[dict]:
    return [{"step": s, "loss": math.nan if s == 3 else 1.0 / s, "token_norm": 0.4 + s * 1e-3} for s in range(1, steps)]


def test_loss_and_istar_pictures(tmp_path):
    tracker = Recorder()
    written = write_run_pictures(tmp_path, history(200), [0.25, 0.5, 0.5, 0.75], tracker)
    assert [p.name for p in written] == ["loss.png", "istar.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert tracker.logged == [("pictures/loss", 1), ("pictures/istar", 1)]


def test_no_sg_no_histogram(tmp_path):
    assert [p.name for p in write_run_pictures(tmp_path, history(20), [])] == ["loss.png"]
    assert not (tmp_path / "istar.png").exists()


def test_reference_grid_layout():
    refs = [Image.new("RGB", (32, 32), "red")] * 3
    gens = [Image.new("RGB", (32, 32), "blue")] * 6
    grid = reference_grid(refs, gens)
    assert grid.size == (3 * 128 + 32 + 5 * 128, 18 + 2 * 128)  # 32x32 shown 4x, refs 3 wide, generated 5 wide
    assert grid.getpixel((10, 30)) == (255, 0, 0) and grid.getpixel((3 * 128 + 32 + 10, 30)) == (0, 0, 255)
    assert reference_grid([], gens).size == (5 * 128, 18 + 2 * 128)  # planted runs have no references


def test_evaluation_writes_the_grid(toy_run):
    evaluate_run(toy_run, {"eval.images_per_prompt": 1, "eval.num_inference_steps": 2, "logger": "none"})
    with Image.open(toy_run / "eval" / "grid.png") as grid:
        assert grid.height == 18 + 2 * 128  # 5 references in one row; the 6 prompts' first images in two
        assert grid.width == 5 * 128 + 32 + 5 * 128
