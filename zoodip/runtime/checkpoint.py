"""Training checkpoints without pickle: the tensors in a safetensors file, everything else in JSON.

In a run dir's checkpoints/ folder:
  last.json                  the commit record: the TrainState fields that are not tensors, each tensor replaced by
                             {"$tensor": name}, and the id and file name of its tensor file
  last-<id>.safetensors      those tensors, by name, with the same id in the file's metadata

A save writes a new tensor file under a fresh random id, then replaces last.json (atomically, the commit point),
then deletes older tensor files. A crash at any moment leaves last.json naming a complete tensor file of its own id;
a load checks the id and the tensor names of both files and refuses a pair that does not match.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from zoodip.errors import ZoodipError
from zoodip.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FORMAT, VERSION = "zoodip-checkpoint", 1
RECORD = "last.json"  # the commit record, in <run dir>/checkpoints/
LEGACY = "last.pt"  # the pickle checkpoint of older versions, refused
TENSOR = "$tensor"  # the JSON stand-in for a tensor: {"$tensor": its name in the safetensors file}
START_OVER = "start over with train.resume=null"


@dataclass
class TrainState:
    """Everything training resumes from. The field names are the checkpoint's schema (JSON keys; tensor names
    are these keys' paths joined with "/", e.g. optimizer/state/0/exp_avg)."""

    step: int
    theta: torch.Tensor  # the token, (k * d,)
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict(): tensors, param_groups and scalars
    sg: dict[str, Any] | None  # SubspaceGradient.state_dict(): buffer, projector, i* history
    generator: torch.Tensor  # torch.Generator.get_state(), uint8
    history: list[dict[str, Any]]  # history.csv's rows so far (NaN losses kept: JSON's NaN extension)
    nonfinite: int
    wall_seconds: float
    initial_eval_loss: float | None
    forward_passes: int
    config: dict[str, Any] | None = None  # the resolved run config (None in records of zoodip before 0.1.0)
    zoodip_version: str | None = None  # the package version that wrote it
    estimator: list[torch.Tensor] | None = None  # guided: recent updates; prgf: the previous estimate; hizoo: diag H
    cma: dict[str, Any] | None = (
        None  # method=gfti: CMA-ES's state and RNG (zoodip/method/cmastate.py); no optimizer, no SG
    )


# What a loaded TrainState's fields must be (the rest is checked by the optimizer's and SG's own loaders).
_TYPES = {
    "step": int,
    "theta": torch.Tensor,
    "optimizer": dict,
    "sg": dict | None,
    "generator": torch.Tensor,
    "history": list,
    "nonfinite": int,
    "wall_seconds": int | float,
    "initial_eval_loss": int | float | None,
    "forward_passes": int,
    "config": dict | None,
    "zoodip_version": str | None,
    "cma": dict | None,
}
_OPTIONAL = {"config": None, "zoodip_version": None, "estimator": None, "cma": None}  # fields older records lack


def _split(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` under its path and replaced by {TENSOR: path}."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {TENSOR: name}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{name}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return tensors[value[TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _tensor_names(value: Any) -> set[str]:
    if isinstance(value, dict):
        if set(value) == {TENSOR}:
            return {value[TENSOR]}
        return set().union(*(_tensor_names(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_tensor_names(v) for v in value))
    return set()


def save_checkpoint(folder: str | Path, state: TrainState) -> Path:
    """Write `state` to folder/last.json and its tensor file; returns the record's path."""
    folder = Path(folder)
    ident = secrets.token_hex(8)
    tensors: dict[str, torch.Tensor] = {}
    record = {f.name: _split(getattr(state, f.name), f.name, tensors) for f in fields(TrainState)}
    tensor_file = f"last-{ident}.safetensors"
    metadata = {"format": FORMAT, "version": str(VERSION), "id": ident}
    atomic_write(folder / tensor_file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    header = {"format": FORMAT, "version": VERSION, "id": ident, "tensor_file": tensor_file}
    text = json.dumps({**header, "state": record}, separators=(",", ":")) + "\n"
    atomic_write_text(folder / RECORD, text)  # the commit point
    for old in folder.glob("last-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return folder / RECORD


def read_record(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON record (header and state, tensors not read), checked for format and version."""
    if path.name == LEGACY or path.suffix == ".pt":
        raise ZoodipError(legacy_message(path))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("state"), dict)
    except (OSError, ValueError, RecursionError) as err:
        raise ZoodipError(f"checkpoint {path} is not a readable JSON file ({err}); {START_OVER}") from None
    if not ok:
        raise ZoodipError(f"checkpoint {path} is not a zoodip checkpoint record; {START_OVER}")
    if record.get("version") != VERSION:
        raise ZoodipError(f"checkpoint {path} has version {record.get('version')!r}, not {VERSION}; {START_OVER}")
    return record


def load_checkpoint(path: str | Path) -> TrainState:
    """The TrainState saved at `path` (a last.json). Anything unreadable or mismatched is a ZoodipError."""
    path = Path(path)
    record = read_record(path)
    ident, tensor_file = str(record.get("id")), str(record.get("tensor_file"))
    if Path(tensor_file).name != tensor_file or tensor_file != f"last-{ident}.safetensors":
        raise ZoodipError(f"checkpoint {path} names the tensor file {tensor_file!r}, not its own; {START_OVER}")
    tensor_path = path.parent / tensor_file
    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            stored_id = (f.metadata() or {}).get("id")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # missing, truncated or damaged: safetensors' own error types vary by version
        raise ZoodipError(
            f"checkpoint tensors {tensor_path} are missing or damaged ({type(err).__name__}: {err}); {START_OVER}"
        ) from None
    state = record["state"]
    if stored_id != ident or set(tensors) != _tensor_names(state):
        raise ZoodipError(
            f"checkpoint {path} and its tensor file {tensor_path.name} do not match (id {ident} vs {stored_id}, "
            f"or other tensors); {START_OVER}"
        )
    try:
        values = {
            f.name: _join(state[f.name] if f.name in state else _OPTIONAL[f.name], tensors) for f in fields(TrainState)
        }
        values["optimizer"]["state"] = {int(k): v for k, v in values["optimizer"]["state"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ZoodipError(f"checkpoint {path} lacks or garbles {err}; {START_OVER}") from None
    wrong = [k for k, kind in _TYPES.items() if not isinstance(values[k], kind) or isinstance(values[k], bool)]
    wrong += ["generator"] if getattr(values["generator"], "dtype", None) != torch.uint8 else []
    if wrong:
        raise ZoodipError(f"checkpoint {path} has a {wrong[0]} of the wrong type; {START_OVER}")
    return TrainState(**values)


def legacy_message(path: Path) -> str:
    return (
        f"{path} is a pickle checkpoint of an older zoodip, which this version does not load (unpickling can run "
        f"code); {START_OVER} (or delete the file), or resume with the zoodip version that wrote it"
    )


def locate_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint record of a run dir, its checkpoints/ folder, or a record file itself; None if there is
    none. An old pickle checkpoint (checkpoints/last.pt) where no record is found is a ZoodipError."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.name == LEGACY or path.suffix == ".pt":
            raise ZoodipError(legacy_message(path))
        return path
    if not path.is_dir():
        return None
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (folder / RECORD).is_file():
        return folder / RECORD
    if (folder / LEGACY).is_file():
        raise ZoodipError(legacy_message(folder / LEGACY))
    return None


# ------------------------------------------------------------------------------------------------ what a run is
# A run's math: resuming or skipping a run under a config that differs in any of these keys is refused. Everything
# else (train.steps upward, logging, eval, progress, checkpoint and save intervals, device) may change.
MATH_KEYS = ("model", "quantization", "method", "estimator", "sg", "puts", "optimizer", "data", "train.seed")
NOT_MATH = ("model.steps",)  # the per-model default of train.steps
_ABSENT = object()


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain JSON values, as a checkpoint and metrics.json record it."""
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True)))


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


SHIPPED = "zoodip/assets"  # the toy world, its captions, the tiny models: the same in every clone


def _in_checkout(value: Any, root: Any) -> Any:
    """A path to the assets shipped inside the config's own checkout (paths.root_dir), written relative to it: the same
    run resumes from another clone or worktree of the repository. Any other path (a dataset/ subject, an outputs/
    token) is compared as it is, since it may hold other files in another clone."""
    if not (isinstance(value, str) and isinstance(root, str) and root):
        return value
    shipped = f"{root}/{SHIPPED}"
    return "<paths.root_dir>" + value[len(root) :] if value == shipped or value.startswith(shipped + "/") else value


def _math(config: dict[str, Any]) -> dict[str, Any]:
    root = (config.get("paths") or {}).get("root_dir")
    flat = {k: _in_checkout(v, root) for key, sub in config.items() for k, v in _flatten(sub, key).items()}
    math_keys = MATH_KEYS
    if flat.get("optimizer.schedule", "constant") != "constant":  # a decaying lr spans train.steps: it is math too
        math_keys = (*MATH_KEYS, "train.steps")
    return {k: v for k, v in flat.items() if k.startswith(tuple(f"{m}." for m in math_keys)) or k in math_keys}


def math_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted math keys whose values differ between two resolved configs (or that only one of them has)."""
    a, b = _math(saved), _math(current)
    return sorted(k for k in a.keys() | b.keys() if k not in NOT_MATH and a.get(k, _ABSENT) != b.get(k, _ABSENT))


def describe_differences(saved: dict[str, Any], current: dict[str, Any], keys: list[str]) -> str:
    a, b = _math(saved), _math(current)
    shown = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:6]]
    return "; ".join(shown) + (f"; and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_same_math(saved: dict[str, Any] | None, cfg: DictConfig, what: str) -> None:
    """Refuse to continue `what` (a checkpoint or a completed run) under a config that changes its math."""
    if saved is None:
        log.warning("%s records no config (an older zoodip wrote it): cannot check that the config is the same", what)
        return
    current = run_config(cfg)
    keys = math_differences(saved, current)
    if keys:
        raise ZoodipError(
            f"{what} was made with another config ({describe_differences(saved, current, keys)}); these keys change "
            f"the training itself: run with the same values, or start over in a new folder (hydra.run.dir=...) "
            f"or with train.resume=null"
        )


def check_resumable(path: Path, cfg: DictConfig) -> None:
    """Before anything heavy is loaded: the checkpoint at `path` belongs to this config, and train.steps reaches
    at least its step. Only the JSON record is read."""
    state = read_record(path)["state"]
    saved = state.get("config")
    check_same_math(saved if isinstance(saved, dict) else None, cfg, f"checkpoint {path}")
    step = state.get("step")
    if isinstance(step, int) and int(cfg.train.steps) < step:
        raise ZoodipError(
            f"train.steps={cfg.train.steps} is below the step of checkpoint {path} ({step}): raise train.steps, or "
            f"start over with train.resume=null"
        )
