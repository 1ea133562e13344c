"""One run across several processes (train.distributed): the forward passes of a step spread over the ranks.

A zeroth-order step evaluates n + 1 independent losses at one shared sample (latent, noise, timestep, prompt).
Every rank draws that sample, and the step's directions, from the same seeds (MeZO's trick, which zoodip's
estimators already use), so the only thing the ranks must exchange is the losses: each rank evaluates a contiguous
share of the step's candidates, one all-reduce (a sum over zero-padded vectors: x + 0 is exact) gives every rank
all of them, and every rank applies the same update. The token, the optimizer's state, SG's buffer and the stateful
estimators' state stay identical on every rank by construction; nothing else is sent after start-up.

Started by `torchrun --nproc_per_node=K zoodip-train ...` (or `python -m zoodip.runtime.train` under torchrun),
or under SLURM by Hydra's submitit launcher with `tasks_per_node=K`, whose environment (SLURM_PROCID, SLURM_NTASKS,
the first node of SLURM_JOB_NODELIST) gives the rendezvous when torchrun's variables are absent. gloo on the CPU,
NCCL on CUDA (each rank its own device, LOCAL_RANK). Rank 0 alone writes files and logs; a stop signal on any rank
stops every rank after the same step (one more float per step: the stop flag).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from zoodip.errors import ZoodipError

log = logging.getLogger("zoodip.runtime.distributed")


@dataclass
class Group:
    """This process's place in the run: its rank among `world` processes. `world == 1` is a single process, for which
    every method here is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    floats_sent: int = 0  # floats this rank put into collectives after start-up (losses and stop flags)
    collectives: int = 0
    started: bool = field(default=False, repr=False)  # rank 0's go (or refusal) has been sent

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, m: int) -> tuple[int, int]:
        """[start, stop) of the m candidates this rank evaluates: contiguous, sizes differing by at most one."""
        base, extra = divmod(m, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def spread(self, losses: Callable[[torch.Tensor], torch.Tensor], count: Callable[[int], None]):
        """`losses` (m candidates -> m losses) evaluated on this rank's share only, the others' filled in by one
        all-reduce of m floats. `count(k)` adds the k forward passes the other ranks ran (every rank counts the
        step's total)."""
        if not self.active:
            return losses

        def spread_losses(thetas: torch.Tensor) -> torch.Tensor:
            m = thetas.shape[0]
            start, stop = self.share(m)
            full = torch.zeros(m, dtype=torch.float32)
            if stop > start:
                full[start:stop] = losses(thetas[start:stop]).detach().float().cpu()
            self.all_reduce(full)
            count(m - (stop - start))
            return full

        return spread_losses

    def stop_requested(self, local: bool) -> bool:
        """Whether any rank asked to stop (a signal) by the end of this step: one float, the same answer everywhere."""
        if not self.active:
            return local
        flag = torch.tensor([1.0 if local else 0.0])
        self.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        device = _collective_device()
        moved = tensor.to(device)
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved.cpu())
        self.floats_sent += tensor.numel()
        self.collectives += 1

    def go(self) -> None:
        """Start-up: rank 0 tells the others that its checks passed; a rank told otherwise raises ZoodipError."""
        if not self.active or self.started:
            return
        self.started = True
        verdict = self.broadcast_object("go" if self.main else None)
        if verdict != "go":
            raise ZoodipError(f"rank 0 stopped before training: {verdict}")

    def refuse(self, reason: str) -> None:
        """Rank 0 failed before `go`: send the reason, so the other ranks stop instead of waiting for losses."""
        if self.active and self.main and not self.started:
            self.started = True
            with contextlib.suppress(Exception):  # the other ranks may have stopped already, on the same error
                self.broadcast_object(reason)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, value):
        """rank 0's `value` on every rank (start-up only)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> "gpu03"; "node1,node2" -> "node1"."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ZoodipError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), from torchrun itself or made
    from SLURM's (a submitit job with tasks_per_node); None when this process is not one of several."""
    env = dict(os.environ if env is None else env)
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in env}
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
        }
    return None


def start(enabled: bool, device: torch.device) -> Group:
    """The run's Group: with train.distributed, join the process group torchrun or SLURM describes (gloo on the CPU,
    NCCL on CUDA); a single process otherwise. A distributed run started as one process is one sentence."""
    if not enabled:
        return Group()
    env = environment()
    if env is None:
        raise ZoodipError(
            "train.distributed=true needs several processes: start them with torchrun --nproc_per_node=K "
            "(or a SLURM job with several tasks, e.g. hydra/launcher=submitit_slurm "
            "hydra.launcher.tasks_per_node=K); one process runs with train.distributed=false"
        )
    os.environ.update(env)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local % torch.cuda.device_count())  # all the node's GPUs, or only this task's
    if not dist.is_initialized():  # once per process: several runs in one process (tuning_subjects) share it
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        atexit.register(dist.destroy_process_group)
    log.info("rank %d of %d (%s)", rank, world, backend)
    return Group(rank=rank, world=world, local_rank=local)
