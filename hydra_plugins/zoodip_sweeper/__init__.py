"""A Hydra sweeper that skips grid points violating a constraint (e.g. T_L < T_U for the Fig. 7 grid).

Hydra only instantiates sweepers from the `hydra_plugins` namespace package, hence this location.
Select it with `hydra/sweeper=zoodip` and set `hydra.sweeper.where` to a Python comparison over the swept
keys, with dots written as underscores: `where: puts_t_low < puts_t_high`.
"""

# No `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, and the
# structured-config dataclass below needs real (not string) annotations.
import ast
import operator
from dataclasses import dataclass
from typing import Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException

_OPS = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


@dataclass
class ConstrainedSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.zoodip_sweeper.ConstrainedSweeper"
    where: Optional[str] = None  # noqa: UP045 (OmegaConf structured configs want Optional)


ConfigStore.instance().store(group="hydra/sweeper", name="zoodip", node=ConstrainedSweeperConf, provider="zoodip")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def satisfies(where: str, job: list[str]) -> bool:
    """Whether one job's overrides (`key=value` strings) satisfy a chain of comparisons such as `a < b`."""
    names = {o.split("=", 1)[0].lstrip("+~").replace(".", "_"): _value(o.split("=", 1)[1]) for o in job}
    tree = ast.parse(where, mode="eval").body
    if not isinstance(tree, ast.Compare):
        raise HydraException(f"hydra.sweeper.where must be a comparison such as 'a < b', got {where!r}")

    def resolve(node: ast.AST):
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise HydraException(f"hydra.sweeper.where names {node.id!r}, which is not swept")
            return names[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        raise HydraException(f"hydra.sweeper.where may only compare swept keys and constants: {where!r}")

    left = resolve(tree.left)
    for op, comparator in zip(tree.ops, tree.comparators, strict=True):
        right = resolve(comparator)
        if type(op) not in _OPS or not _OPS[type(op)](left, right):
            return False
        left = right
    return True


class ConstrainedSweeper(BasicSweeper):
    """Hydra's basic sweeper (cartesian product, in order) minus the points where `where` is false."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, where: str | None = None):
        # Set BasicSweeper's attributes here rather than calling its __init__: Hydra's plugin scan re-executes
        # hydra's own plugin modules, and BasicSweeper's `super(BasicSweeper, self)` then names another class.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None
        self.where = where

    def split_arguments(self, overrides, max_batch_size):  # type: ignore[override]
        batches = BasicSweeper.split_arguments(overrides, None)
        jobs = [job for job in batches[0] if self.where is None or satisfies(self.where, job)]
        if max_batch_size is None:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]
