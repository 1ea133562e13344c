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
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zoodip.errors import ZoodipError
from zoodip.io import atomic_write, atomic_write_text

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


# What a loaded TrainState's fields must be (the rest is checked by the optimizer's and SG's own loaders).
_TYPES = {"step": int, "theta": torch.Tensor, "optimizer": dict, "sg": dict | None, "generator": torch.Tensor,
          "history": list, "nonfinite": int, "wall_seconds": int | float, "initial_eval_loss": int | float | None,
          "forward_passes": int}  # fmt: skip


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


def load_checkpoint(path: str | Path) -> TrainState:
    """The TrainState saved at `path` (a last.json). Anything unreadable or mismatched is a ZoodipError."""
    path = Path(path)
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
        values = {f.name: _join(state[f.name], tensors) for f in fields(TrainState)}
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
