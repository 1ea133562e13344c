"""Hostile inputs on disk: every one is a clear ZoodipError or a warning and a skip, never a traceback.

Reference images (one reader for training and evaluation), caption files, checkpoints and file modes. No model
is loaded: the checkpoint tests save and load small tensors directly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import zoodip.data.dataset as data
import zoodip.runtime.checkpoint as ckpt
from zoodip.data.dataset import load_captions, load_reference_images, read_reference_images
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import reference_images
from zoodip.io import atomic_write, atomic_write_text, current_umask
from zoodip.runtime.checkpoint import TrainState, load_checkpoint, locate_checkpoint, save_checkpoint


def folder_with(tmp_path: Path, **files: bytes | Image.Image) -> Path:
    """A subject folder holding a good 16x16 image (00_good.png) and the given files."""
    folder = tmp_path / "subject"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (0, 128, 0)).save(folder / "00_good.png")
    for name, content in files.items():
        name = name.replace("__", ".")  # keyword names cannot hold a dot: a__jpg is a.jpg
        if isinstance(content, Image.Image):
            content.save(folder / name)
        else:
            (folder / name).write_bytes(content)
    return folder


def jpeg_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    array = np.random.default_rng(0).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def skipped_one(folder: Path, caplog, name: str, why: str) -> None:
    """The folder reads as its one good image, with one warning naming `name` and why."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoodip.data.dataset"):
        refs = read_reference_images(str(folder))
    assert refs.names == ["00_good.png"]
    records = [r for r in caplog.records if r.name == "zoodip.data.dataset"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert f"skipping {name} (" in message or f"; {name} (" in message, message
    assert why in message, message
    message.encode("utf-8")  # printable on any UTF-8 log handler


# ---------------------------------------------------------------------------------------------------------------
# broken or odd image files: skipped with a warning, or read correctly


def test_truncated_jpeg_is_skipped(tmp_path, caplog):
    folder = folder_with(tmp_path, cut__jpg=jpeg_bytes()[:300])
    skipped_one(folder, caplog, "cut.jpg", "truncated")


def test_zero_byte_file_is_skipped(tmp_path, caplog):
    skipped_one(folder_with(tmp_path, empty__png=b""), caplog, "empty.png", "an empty file")


def test_text_file_named_jpg_is_skipped(tmp_path, caplog):
    folder = folder_with(tmp_path, notes__jpg=b"these are my notes, not a picture\n")
    skipped_one(folder, caplog, "notes.jpg", "not a JPEG, PNG, WebP, BMP, TIFF or GIF image")


def test_rgba_png_is_composited_onto_white(tmp_path):
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # transparent: white, not the red hidden under it
    image.putpixel((1, 0), (0, 0, 255, 255))
    folder = tmp_path / "s"
    folder.mkdir()
    image.save(folder / "a.png")
    (loaded,) = reference_images(str(folder))
    assert (
        loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 0)) == (0, 0, 255)
    )


def test_palette_png_keeps_its_colours(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "p.png")
    with Image.open(folder / "p.png") as im:
        assert im.mode == "P"
    (loaded,) = reference_images(str(folder))
    assert loaded.mode == "RGB" and loaded.getpixel((3, 3)) == (10, 200, 30)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(folder / "deep.png")  # 32896 / 257 = 128
    with Image.open(folder / "deep.png") as im:
        assert im.mode.startswith("I")
    (loaded,) = reference_images(str(folder))
    assert loaded.getpixel((0, 0)) == (128, 128, 128)


def test_grayscale_becomes_rgb(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("L", (8, 8), 77).save(folder / "g.png")
    images, names = load_reference_images(str(folder), 4)
    assert images.shape == (1, 3, 4, 4) and names == ["g.png"]
    assert torch.allclose(images, torch.full_like(images, 77 / 127.5 - 1))


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "print.jpg")  # red in ink
    with Image.open(folder / "print.jpg") as im:
        assert im.mode == "CMYK"
    (loaded,) = reference_images(str(folder))
    r, g, b = loaded.getpixel((8, 8))
    assert loaded.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_multi_picture_jpeg_from_a_phone_is_read(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    first, second = Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))
    first.save(folder / "phone.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(folder / "phone.jpg") as im:
        assert im.format == "MPO"
    (loaded,) = reference_images(str(folder))
    assert loaded.getpixel((4, 4))[0] > 200


def exif_rotated(folder: Path) -> Path:
    """A 40x20 JPEG, left half red and right half blue, stored with EXIF orientation 6 (display rotated 90 CW)."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    folder.mkdir(exist_ok=True)
    image.save(folder / "phone.jpg", exif=exif, quality=95)
    return folder


def test_exif_rotated_jpeg_is_turned_upright_in_both_readers(tmp_path):
    folder = exif_rotated(tmp_path / "s")
    (loaded,) = reference_images(str(folder))
    assert loaded.size == (20, 40)  # turned before anything else: portrait
    assert loaded.getpixel((10, 5))[0] > 200 and loaded.getpixel((10, 35))[2] > 200  # red on top, blue below
    (square,) = read_reference_images(str(folder), 20).images  # training: the centre square of the upright image
    top, bottom = square.getpixel((10, 2)), square.getpixel((10, 17))
    assert top[0] > 200 and bottom[2] > 200


def test_1x1_image_is_read(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (1, 1), (255, 255, 255)).save(folder / "dot.png")
    images, _ = load_reference_images(str(folder), 8)
    assert images.shape == (1, 3, 8, 8) and torch.allclose(images, torch.ones_like(images))


def test_extreme_aspect_ratio_is_cropped_to_its_centre(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    strip = Image.new("RGB", (2000, 10), (0, 0, 0))
    strip.paste((255, 255, 255), (995, 0, 1005, 10))  # only the centre 10 px are white
    strip.save(folder / "strip.png")
    (square,) = read_reference_images(str(folder), 16).images
    assert square.size == (16, 16) and square.getpixel((8, 8)) == (255, 255, 255)


@pytest.mark.parametrize("side", [12, 20])  # 144 px: the warning (raised here as an error); 400 px: Pillow's error
def test_decompression_bomb_is_skipped(tmp_path, caplog, monkeypatch, side):
    folder = folder_with(tmp_path, bomb__png=Image.new("RGB", (side, side)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 00_good.png: 16x16 = 256 px, so it must go too
    (folder / "00_good.png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "00_good.png")
    filters = list(warnings.filters)
    skipped_one(folder, caplog, "bomb.png", "too many pixels")
    assert warnings.filters == filters  # the warning is an error inside the reader only


def test_huge_jpeg_is_reduced_while_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LOAD_MIN_SIDE", 16)
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(jpeg_bytes((160, 64)))
    drafts = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    (loaded,) = reference_images(str(folder))
    assert drafts == [(16, 16)] and loaded.size == (40, 16)  # decoded at 1/4 scale: shorter side still >= 16


def test_huge_png_is_reduced_by_an_integer_factor(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LOAD_MIN_SIDE", 16)
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (100, 50), (1, 2, 3)).save(folder / "big.png")
    (loaded,) = reference_images(str(folder))
    assert loaded.size == (34, 17) and loaded.getpixel((0, 0)) == (1, 2, 3)  # reduce(3): ceil(100 / 3), ceil(50 / 3)


def test_animated_gif_gives_its_first_frame(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    red.save(folder / "anim.gif", save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(folder / "anim.gif") as im:
        assert im.n_frames == 2
    (loaded,) = reference_images(str(folder))
    assert loaded.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".tif", ".TIFF"])
def test_tiff_is_read_by_training_and_evaluation(tmp_path, suffix):
    folder = tmp_path / "s"
    folder.mkdir()
    Image.new("RGB", (8, 8), (9, 99, 199)).save(folder / f"scan{suffix}", format="TIFF")
    assert read_reference_images(str(folder), 8).names == [f"scan{suffix}"]
    (loaded,) = reference_images(str(folder))
    assert loaded.getpixel((0, 0)) == (9, 99, 199)


def raw_name_file(folder: Path, raw: bytes, content: bytes) -> str:
    """A file whose name is `raw` bytes (not UTF-8); skips the test where the file system refuses such names."""
    try:
        fd = os.open(os.fsencode(folder) + b"/" + raw, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as err:
        pytest.skip(f"this file system refuses non-UTF-8 names ({err})")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    return os.fsdecode(raw)


def test_non_utf8_file_names_are_read_and_shown_safely(tmp_path, caplog):
    folder = folder_with(tmp_path)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 1, 1)).save(buf, format="PNG")
    good = raw_name_file(folder, b"caf\xe9.png", buf.getvalue())
    bad = raw_name_file(folder, b"br\xffoken.jpg", b"not an image")
    with caplog.at_level(logging.WARNING, logger="zoodip.data.dataset"):
        refs = read_reference_images(str(folder))
    assert refs.names == ["00_good.png", good]  # read; the name keeps its surrogate escape (os.fsencode gives it back)
    assert repr(bad) in caplog.text and "\udcff" not in caplog.text  # shown with repr: printable, encodable
    caplog.text.encode("utf-8")


def test_symlink_loop_is_skipped(tmp_path, caplog):
    folder = folder_with(tmp_path)
    os.symlink("loop.png", folder / "loop.png")
    skipped_one(folder, caplog, "loop.png", "unreadable: Too many levels of symbolic links")


def test_unreadable_file_is_skipped(tmp_path, caplog):
    folder = folder_with(tmp_path, locked__png=Image.new("RGB", (8, 8)))
    locked = folder / "locked.png"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: a mode-000 file is still readable")
        skipped_one(folder, caplog, "locked.png", "Permission denied")
    finally:
        locked.chmod(0o644)


def test_fifo_is_skipped_without_blocking(tmp_path, caplog):
    folder = folder_with(tmp_path)
    os.mkfifo(folder / "pipe.png")
    skipped_one(folder, caplog, "pipe.png", "not a regular file")


def test_one_warning_names_every_skipped_entry(tmp_path, caplog):
    folder = folder_with(tmp_path, **{".DS_Store": b"x", "notes__txt": b"hello", "cut__jpg": b"\xff\xd8\xff"})
    (folder / "extra").mkdir()
    with caplog.at_level(logging.WARNING, logger="zoodip.data.dataset"):
        assert read_reference_images(str(folder)).names == ["00_good.png"]
    (record,) = [r for r in caplog.records if r.name == "zoodip.data.dataset"]
    message = record.getMessage()
    for part in [".DS_Store (hidden)", "notes.txt (not an image file name)", "cut.jpg (", "extra (a sub-folder"]:
        assert part in message, message


# ---------------------------------------------------------------------------------------------------------------
# folders with no usable image: one ZoodipError, the same from both readers

READERS = {"train": lambda p: load_reference_images(p, 8), "eval": reference_images}


@pytest.mark.parametrize("reader", READERS)
def test_empty_folder(tmp_path, reader):
    with pytest.raises(ZoodipError, match="is empty"):
        READERS[reader](str(tmp_path))


@pytest.mark.parametrize("reader", READERS)
def test_only_hidden_files(tmp_path, reader):
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(ZoodipError, match=r"holds no readable image .*\.DS_Store \(hidden\); \.hidden\.png \(hidden\)"):
        READERS[reader](str(tmp_path))


@pytest.mark.parametrize("reader", READERS)
def test_only_a_nested_sub_folder(tmp_path, reader):
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    with pytest.raises(ZoodipError, match=r"no readable image .*photos \(a sub-folder: not searched\)"):
        READERS[reader](str(tmp_path))


@pytest.mark.parametrize("reader", READERS)
def test_a_file_where_a_folder_is_expected(tmp_path, reader):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ZoodipError, match="is not a folder but a file; point it at the folder"):
        READERS[reader](str(tmp_path / "a.png"))


@pytest.mark.parametrize("path", [None, "", "/nonexistent/zoodip/subject"])
def test_unset_or_missing_folder(path):
    with pytest.raises(ZoodipError, match="data.path is not set|is not a folder"):
        read_reference_images(path)


# ---------------------------------------------------------------------------------------------------------------
# captions: config errors naming the file and the entry

NAMES = ["00.jpg", "01.jpg"]


def captions_file(tmp_path: Path, content) -> str:
    path = tmp_path / "captions.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def caption_error(tmp_path, content, match, names=NAMES, entries=None):
    path = captions_file(tmp_path, content)
    with pytest.raises(ZoodipError, match=match) as info:
        load_captions(path, "dog6", names, entries)
    assert "captions.json" in str(info.value)
    return str(info.value)


def good(**overrides):
    return {"dog6": {"00.jpg": "a photo of {} on grass", "01.jpg": "{} asleep", **overrides}}


def test_captions_not_json(tmp_path):
    caption_error(tmp_path, "{'dog6': 'single quotes'}", "is not a readable JSON file")


def test_captions_not_utf8(tmp_path):
    path = tmp_path / "captions.json"
    path.write_bytes(b'{"dog6": {"00.jpg": "caf\xe9 {}"}}')
    with pytest.raises(ZoodipError, match="captions.json.*is not a readable JSON file"):
        load_captions(str(path), "dog6", NAMES)


@pytest.mark.parametrize("content", [["a photo of {}"], '"a photo of {}"', 3])
def test_captions_top_level_is_not_an_object(tmp_path, content):
    caption_error(tmp_path, content, r"must be a JSON object \{subject")


def test_captions_subject_entry_is_not_an_object(tmp_path):
    message = caption_error(tmp_path, {"dog6": ["a photo of {}"]}, "entry 'dog6' must be")
    assert "list" in message


def test_captions_another_subjects_entry_is_not_an_object(tmp_path):
    caption_error(tmp_path, {**good(), "cat2": "a photo of {}"}, "entry 'cat2' must be")


def test_captions_non_string_caption(tmp_path):
    message = caption_error(tmp_path, good(**{"01.jpg": 7}), r"entry \['dog6'\]\['01.jpg'\]: the caption must be")
    assert "int" in message


@pytest.mark.parametrize(
    ("caption", "match"),
    [
        ("a photo of a dog", r"has no '\{\}' where the placeholder goes"),
        ("{} next to {}", "has 2 fields in braces"),
        ("a photo of {0}", r"has the field '\{0\}' instead of '\{\}'"),
        ("a photo of {x}", r"has the field '\{x\}' instead of '\{\}'"),
        ("a photo of {!r}", r"has the field '\{!r\}'"),
        ("a photo of {:>9}", r"has the field '\{:>9\}'"),
        ("a {photo of {}", "is not a valid template"),
        ("a photo} of {}", "is not a valid template"),
    ],
)
def test_captions_slot_problems(tmp_path, caption, match):
    message = caption_error(tmp_path, good(**{"00.jpg": caption}), match)
    assert "entry ['dog6']['00.jpg']" in message and "exactly one '{}'" in message


def test_captions_unknown_image_name(tmp_path):
    content = good(**{"0l.jpg": "a typo {}"})
    caption_error(tmp_path, content, r"entry \['dog6'\]\['0l.jpg'\]: data.path has no file of that name")


def test_captions_missing_image(tmp_path):
    content = {"dog6": {"00.jpg": "a photo of {}"}}
    caption_error(tmp_path, content, r"has no caption for 01.jpg of subject 'dog6' \(entry \['dog6'\]\)")


def test_captions_no_entry_for_the_subject(tmp_path):
    caption_error(tmp_path, {"cat2": {}}, "has no entry for subject 'dog6'")


def test_captions_valid_literal_braces_and_skipped_files(tmp_path):
    """ "{{" is a literal brace; a caption for a file that is in the folder but was skipped is not unknown."""
    content = good(**{"00.jpg": "a {{cute}} photo of {}", "02.jpg": "an unreadable {}"})
    path = captions_file(tmp_path, content)
    captions = load_captions(path, "dog6", NAMES, entries=[*NAMES, "02.jpg"])
    assert captions == ["a {{cute}} photo of {}", "{} asleep"]
    assert captions[0].format("<dog6>") == "a {cute} photo of <dog6>"


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, no pickle


def small_state(step: int = 3) -> TrainState:
    theta = torch.nn.Parameter(torch.randn(16, generator=torch.Generator().manual_seed(step)))
    optimizer = torch.optim.Adam([theta], lr=1e-3, betas=(0.9, 0.99))
    theta.grad = torch.ones(16)
    optimizer.step()
    sg = {"buffer": torch.randn(4, 16), "projector": torch.zeros(0, 16), "istar": [(4, 2)]}
    history = [{"step": 1, "loss": float("nan"), "lr": 1e-3}, {"step": 2, "loss": 0.5, "lr": 1e-3}]
    generator = torch.Generator().manual_seed(7).get_state()
    return TrainState(step, theta.detach(), optimizer.state_dict(), sg, generator, history, 1, 2.5, None, 9)


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = small_state()
    record = save_checkpoint(tmp_path / "checkpoints", state)
    back = load_checkpoint(record)
    assert torch.equal(back.theta, state.theta) and torch.equal(back.generator, state.generator)
    assert back.generator.dtype == torch.uint8
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(back.optimizer["state"][0][key], state.optimizer["state"][0][key])
    assert back.optimizer["param_groups"][0]["betas"] == [0.9, 0.99]
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(16))]).load_state_dict(back.optimizer)
    assert torch.equal(back.sg["buffer"], state.sg["buffer"]) and back.sg["projector"].shape == (0, 16)
    assert back.history[0]["loss"] != back.history[0]["loss"] and back.history[1] == state.history[1]  # NaN kept
    assert (back.step, back.nonfinite, back.wall_seconds, back.initial_eval_loss, back.forward_passes) == (
        3,
        1,
        2.5,
        None,
        9,
    )
    assert not any(p.suffix == ".pt" for p in (tmp_path / "checkpoints").iterdir())


def test_checkpoint_save_replaces_the_previous_pair(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, small_state(3))
    save_checkpoint(folder, small_state(6))
    assert len(list(folder.glob("last-*.safetensors"))) == 1 and not list(folder.glob(".*"))
    assert load_checkpoint(folder / "last.json").step == 6


def test_truncated_safetensors_checkpoint(tmp_path):
    record = save_checkpoint(tmp_path, small_state())
    (tensors,) = tmp_path.glob("last-*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ZoodipError, match=r"are missing or damaged .*start over with train.resume=null"):
        load_checkpoint(record)


def test_missing_tensor_file(tmp_path):
    record = save_checkpoint(tmp_path, small_state())
    next(tmp_path.glob("last-*.safetensors")).unlink()
    with pytest.raises(ZoodipError, match="are missing or damaged"):
        load_checkpoint(record)


def test_checkpoint_pair_that_does_not_match(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(a, small_state(3))
    save_checkpoint(b, small_state(6))
    (a_tensors,), (b_tensors,) = a.glob("last-*.safetensors"), b.glob("last-*.safetensors")
    shutil.copyfile(b_tensors, a_tensors)  # a's record, b's tensors under a's file name
    with pytest.raises(ZoodipError, match="do not match"):
        load_checkpoint(a / "last.json")


def test_checkpoint_record_that_is_not_json(tmp_path):
    record = save_checkpoint(tmp_path, small_state())
    record.write_text(record.read_text()[:50])
    with pytest.raises(ZoodipError, match="is not a readable JSON file.*train.resume=null"):
        load_checkpoint(record)


def test_checkpoint_record_with_a_field_of_the_wrong_type(tmp_path):
    record = save_checkpoint(tmp_path, small_state())
    content = json.loads(record.read_text())
    content["state"]["step"] = "3"
    record.write_text(json.dumps(content))
    with pytest.raises(ZoodipError, match="has a step of the wrong type"):
        load_checkpoint(record)
    del content["state"]["history"]
    record.write_text(json.dumps(content))
    with pytest.raises(ZoodipError, match="lacks or garbles 'history'"):
        load_checkpoint(record)


def test_checkpoint_record_pointing_outside_its_folder(tmp_path):
    record = save_checkpoint(tmp_path, small_state())
    content = json.loads(record.read_text())
    content["tensor_file"] = "../../etc/passwd"
    record.write_text(json.dumps(content))
    with pytest.raises(ZoodipError, match="names the tensor file"):
        load_checkpoint(record)


def test_a_crash_before_the_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, small_state(3))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the tensor file and the record")

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, small_state(6))
    assert len(list(tmp_path.glob("last-*.safetensors"))) == 2  # the new, uncommitted one is ignored ...
    assert load_checkpoint(tmp_path / "last.json").step == 3  # ... and the old pair still loads


def test_old_pickle_checkpoint_is_refused(tmp_path):
    from zoodip.runtime.train import find_checkpoint

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: never unpickled
    for resume in ("auto", str(run_dir), str(run_dir / "checkpoints" / "last.pt")):
        with pytest.raises(ZoodipError, match=r"last.pt is a pickle checkpoint .*start over with train.resume=null"):
            find_checkpoint(resume, run_dir)
    with pytest.raises(ZoodipError, match="is a pickle checkpoint"):
        load_checkpoint(run_dir / "checkpoints" / "last.pt")
    save_checkpoint(run_dir / "checkpoints", small_state())  # a run started over: its own checkpoint wins
    assert find_checkpoint("auto", run_dir) == run_dir / "checkpoints" / "last.json"


def test_resume_finds_a_run_dir_checkpoint(tmp_path):
    from zoodip.runtime.train import find_checkpoint

    other = tmp_path / "other"
    save_checkpoint(other / "checkpoints", small_state())
    assert find_checkpoint(str(other), tmp_path / "run") == other / "checkpoints" / "last.json"
    assert find_checkpoint(None, other) is None
    assert find_checkpoint("auto", tmp_path / "fresh") is None  # nothing yet: starts from step 0
    assert locate_checkpoint(other / "checkpoints" / "last.json") == other / "checkpoints" / "last.json"
    with pytest.raises(ZoodipError, match="no checkpoint found"):
        find_checkpoint(str(tmp_path / "fresh"), tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# file modes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert current_umask() == umask and current_umask() == umask  # reading it changes nothing
        path = atomic_write_text(tmp_path / "metrics.json", "{}\n")
        tensors = atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"\0"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode and stat.S_IMODE(tensors.stat().st_mode) == mode


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_built_folders_respect_the_umask(tmp_path, umask, mode):
    """new_folder (eval/, generate's output, a built toy world) gets mkdir's mode, not mkdtemp's 0o700."""
    from zoodip.io import new_folder

    old = os.umask(umask)
    try:
        with new_folder(tmp_path / "eval") as staging:
            (staging / "a.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "eval").stat().st_mode) == mode


def test_atomic_write_fsyncs_before_the_rename_and_cleans_up_a_failure(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = atomic_write_text(tmp_path / "a.txt", "old")
    assert len(synced) >= 1

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
