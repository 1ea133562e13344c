"""CMA-ES's state as plain data, for a checkpoint without pickle (method=gfti).

The `cma` package keeps its state in the attributes of `CMAEvolutionStrategy` and of the cma objects it owns: the
mean, sigma, the covariance C with its eigendecomposition B, D (the sampler's), the evolution paths pc and ps, the
iteration and evaluation counters, the fitness history, ... `snapshot` walks them and keeps every attribute whose
value is plain data: numbers, strings, numpy arrays and scalars, and lists, tuples and string-keyed dicts of those;
the arrays become torch tensors (the checkpoint's safetensors file), the rest stays JSON. `restore` writes those
values back into a freshly built strategy of the same options: it sets attributes of objects that already exist and
never builds an object from the checkpoint. Options, the logger and the wall-clock timer are not state.

Two arrays that were one object (e.g. the strategy's C and its sampler's C) are one object again after `restore`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from zoodip.errors import ZoodipError

log = logging.getLogger(__name__)

#: Attributes of the strategy that are configuration or bookkeeping, not state.
SKIP = frozenset({"opts", "inopts", "inputargs", "logger", "timer"})
_MARKERS = ("$ndarray", "$ref", "$numpy", "$tuple", "$object")
_TORCH_SAFE = {"float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


class _Unrepresentable(Exception):
    """A value that is not plain data: its attribute is left out."""


def _is_cma_object(value: Any) -> bool:
    kind = type(value)
    return (
        (kind.__module__ or "").startswith("cma.")
        and hasattr(value, "__dict__")
        and not isinstance(value, dict | list | tuple | set)
    )


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[int, int] = {}  # id(array) -> its number
        self.keep: list[np.ndarray] = []  # the arrays seen, alive while encoding (ids stay unique)
        self.objects: set[int] = set()

    def value(self, v: Any) -> Any:
        if v is None or isinstance(v, bool | int | float | str):
            return v
        if isinstance(v, np.ndarray):
            if id(v) in self.arrays:
                return {"$ref": self.arrays[id(v)]}
            if v.dtype.kind not in "biuf":
                raise _Unrepresentable
            number = len(self.arrays)
            self.arrays[id(v)] = number
            self.keep.append(v)
            dtype = v.dtype.name
            stored = v if dtype in _TORCH_SAFE else v.astype(np.float64 if v.dtype.kind == "f" else np.int64)
            return {"$ndarray": torch.from_numpy(np.array(stored, copy=True)), "dtype": dtype, "id": number}
        if isinstance(v, np.generic):
            if v.dtype.kind not in "biuf":
                raise _Unrepresentable
            return {"$numpy": v.dtype.name, "value": v.item()}
        if type(v) is tuple:
            return {"$tuple": [self.value(x) for x in v]}
        if type(v) is list:
            return [self.value(x) for x in v]
        if type(v) is dict:
            if not all(isinstance(k, str) and not k.startswith("$") for k in v):
                raise _Unrepresentable
            return {k: self.value(x) for k, x in v.items()}
        if _is_cma_object(v):
            return self.object(v)
        raise _Unrepresentable

    def object(self, obj: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        if id(obj) in self.objects:  # a cycle or a second path to it: its state is written once
            raise _Unrepresentable
        self.objects.add(id(obj))
        attrs = {}
        for name, v in vars(obj).items():
            if name in skip:
                continue
            try:
                attrs[name] = self.value(v)
            except _Unrepresentable:
                continue
        return {"$object": type(obj).__qualname__, "attrs": attrs}


def numpy_rng_state() -> tuple:
    return np.random.get_state(legacy=True)


def snapshot(es: Any, rng_state: tuple) -> dict[str, Any]:
    """The strategy's state and the numpy RNG state its samples come from, as JSON with torch tensors."""
    import cma

    enc = _Encoder()
    return {"cma_version": cma.__version__, "es": enc.object(es, SKIP), "rng": enc.value(tuple(rng_state))}


class _Decoder:
    def __init__(self, where: str) -> None:
        self.arrays: dict[int, np.ndarray] = {}
        self.where = where

    def bad(self, what: str) -> ZoodipError:
        return ZoodipError(f"{self.where}: the CMA-ES state {what}; start over with train.resume=null")

    def value(self, v: Any) -> Any:
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "$ndarray" in v:
            tensor = v["$ndarray"]
            if not isinstance(tensor, torch.Tensor) or not isinstance(v.get("id"), int):
                raise self.bad("holds an array that is not a tensor")
            try:
                array = tensor.numpy().astype(np.dtype(str(v.get("dtype"))), copy=True)
            except TypeError as err:
                raise self.bad(f"holds an array of an unknown type ({err})") from None
            self.arrays[v["id"]] = array
            return array
        if "$ref" in v:
            if v["$ref"] not in self.arrays:
                raise self.bad("refers to an array it does not hold")
            return self.arrays[v["$ref"]]
        if "$numpy" in v:
            try:
                return np.dtype(str(v["$numpy"])).type(v["value"])
            except (TypeError, ValueError, KeyError) as err:
                raise self.bad(f"holds a number of an unknown type ({err})") from None
        if "$tuple" in v:
            return tuple(self.value(x) for x in v["$tuple"])
        if "$object" in v:
            raise self.bad("holds an object where plain data belongs")
        return {k: self.value(x) for k, x in v.items()}

    def into(self, obj: Any, node: Any, path: str) -> None:
        """Set the attributes that `node` (an encoded object) holds on `obj`, an object of the same class."""
        if not isinstance(node, dict) or not isinstance(node.get("attrs"), dict):
            raise self.bad(f"lacks the attributes of {path}")
        if node.get("$object") != type(obj).__qualname__:
            raise self.bad(f"has a {node.get('$object')!r} at {path}, this cma a {type(obj).__qualname__!r}")
        for name, v in node["attrs"].items():
            if isinstance(v, dict) and "$object" in v:
                child = getattr(obj, name, None)
                if child is None or not _is_cma_object(child):
                    raise self.bad(f"has an object at {path}.{name}, which this cma does not build")
                self.into(child, v, f"{path}.{name}")
            else:
                setattr(obj, name, self.value(v))


def restore(es: Any, state: dict[str, Any], where: str = "checkpoint") -> tuple:
    """Write `snapshot`'s `state` into `es` (built with the same options); returns the numpy RNG state to sample from.
    A state of another shape is a ZoodipError."""
    import cma

    dec = _Decoder(where)
    if not isinstance(state, dict) or "es" not in state or "rng" not in state:
        raise dec.bad("is missing")
    if state.get("cma_version") != cma.__version__:
        log.warning(
            "%s: the CMA-ES state was written with cma %s, this is cma %s: the resumed run may not equal an "
            "uninterrupted one",
            where,
            state.get("cma_version"),
            cma.__version__,
        )
    dec.into(es, state["es"], "es")
    if not hasattr(es, "timer"):  # made by the first ask(), which a restored strategy has had
        from cma.utilities.utils import ElapsedWCTime

        es.timer = ElapsedWCTime()
    rng = dec.value(state["rng"])
    if not isinstance(rng, tuple) or len(rng) != 5 or rng[0] != "MT19937":
        raise dec.bad("holds no numpy RNG state")
    return rng
