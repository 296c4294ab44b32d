"""Training on several processes with torchrun: DistributedDataParallel, sharded work, rank 0 writes.

``torchrun --nproc_per_node N infantino ...`` starts N copies of the command and tells each who
it is through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
:func:`session` joins them into one process group (gloo on CPU, nccl on CUDA, one GPU per
process); without those variables, or with ``WORLD_SIZE=1``, nothing changes: :func:`current`
answers "rank 0 of 1" and every helper here is the single-process identity.

What is split and what is shared:

- every process loads the same data and makes the same split (same seed);
- training: each process takes its part of every epoch (``DistributedSampler``, or
  :class:`DistributedWeightedSampler` for class-balanced sampling), DDP averages the gradients,
  so the processes hold one model; ``--batch-size`` stays the global batch (split evenly);
- metrics (training loss, validation accuracy) are summed over the processes' parts;
- embedding extraction: each process embeds its contiguous slice, and every process gets all rows;
- only rank 0 writes checkpoints, talks to MLflow and registers the models.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from backbones.inference import embed_images, pick_device

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a process waits for the others at a collective (rank 0 may be registering in MLflow).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Dist:
    """Who this process is among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Dist":
        """What torchrun says (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); rank 0 of 1 without it."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world, rank, local = int(env["WORLD_SIZE"]), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))
        except ValueError as exc:
            raise ValueError(f"torchrun variables must be integers: {({k: env.get(k) for k in TORCHRUN_VARIABLES})}") from exc
        if world < 1 or not 0 <= rank < world or local < 0:
            raise ValueError(f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
        return cls(rank, world, local)


def _dist():
    import torch.distributed as dist

    return dist


def current() -> Dist:
    """This process's place in the running process group (rank 0 of 1 outside one)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def device_for(requested: str | None, d: Dist) -> torch.device:
    """The device this process trains on: as asked (CUDA when present), one GPU per local rank."""
    device = pick_device(requested)
    if d.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank)
    return device


@contextmanager
def session(device: str | None = None) -> Iterator[Dist]:
    """Join the torchrun process group for the duration (gloo on CPU, nccl on CUDA).

    Without torchrun this yields rank 0 of 1 and does nothing; inside an already joined group
    it yields that group and leaves it to whoever joined it.
    """
    d = Dist.from_env()
    dist = _dist()
    if not d.enabled or dist.is_initialized():
        yield current()
        return
    dev = device_for(device, d)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


# ---- collectives (identities when alone) ----------------------------------------------------------
def _comm_device() -> torch.device:
    dist = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if current().enabled:
        _dist().barrier()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the processes (float64)."""
    if not current().enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    _dist().all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    d = current()
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` in every process."""
    if not current().enabled:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def main_first(make: Callable[[], T]) -> T:
    """``make()`` in rank 0 first, then in the others (e.g. a store whose first use creates tables)."""
    d = current()
    if d.is_main:
        made = make()
        barrier()
        return made
    barrier()
    return make()


# ---- sharding ------------------------------------------------------------------------------------
def shard(n: int, d: Dist | None = None) -> tuple[int, int]:
    """This process's contiguous slice [start, stop) of n rows (all of them when alone)."""
    d = d or current()
    return n * d.rank // d.world_size, n * (d.rank + 1) // d.world_size


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's slice (see :func:`shard`) of an (n, ...) array, put back together in every process."""
    d = current()
    if not d.enabled:
        return local
    bounds = [shard(n, Dist(r, d.world_size)) for r in range(d.world_size)]
    widest = max(stop - start for start, stop in bounds)
    padded = np.zeros((widest, *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    device = _comm_device()
    mine = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(mine) for _ in range(d.world_size)]
    _dist().all_gather(parts, mine)
    return np.concatenate([p[: stop - start].cpu().numpy() for p, (start, stop) in zip(parts, bounds)])


def embed_sharded(model: nn.Module, x_uint8: np.ndarray, prep, progress: str | None = None, **kwargs) -> np.ndarray:
    """``backbones.inference.embed_images`` with each process embedding its slice; all rows everywhere."""
    d = current()
    if not d.enabled:
        return embed_images(model, x_uint8, prep, progress=progress, **kwargs)
    start, stop = shard(len(x_uint8), d)
    local = embed_images(model, x_uint8[start:stop], prep, progress=progress if d.is_main else None, **kwargs)
    return gather_rows(local, len(x_uint8))


# ---- training pieces ------------------------------------------------------------------------------
class DistributedWeightedSampler(Sampler[int]):
    """Class-balanced sampling split over processes: ``WeightedRandomSampler`` for DDP.

    Each epoch every process draws the same weighted sample with replacement from ``generator``
    (seeded alike everywhere, so the draws agree without communication) and keeps every
    ``world_size``-th item from its rank on: together the processes cover one draw of
    ``num_samples`` items (rounded down to a multiple of ``world_size``), each the same number.
    """

    def __init__(self, weights: Sequence[float] | np.ndarray | torch.Tensor, num_samples: int, rank: int, world_size: int,
                 generator: torch.Generator):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.double)
        self.per_rank = num_samples // world_size
        if self.per_rank < 1:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} processes")
        self.rank, self.world_size, self.generator = rank, world_size, generator

    def __iter__(self) -> Iterator[int]:
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=self.generator)
        return iter(drawn[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


class _Logits(nn.Module):
    """DDP synchronises gradients of what runs through ``forward``; training runs ``logits``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """A DDP module whose forward is ``model.logits``, over the parameters that require a gradient
    now (rebuild it when that changes, e.g. after a frozen stage): frozen ones stay untouched."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Logits(model), device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_state(model: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers in every process. After an epoch the parameters already
    agree (DDP) but each process's own last forward moved its BatchNorm statistics: broadcasting
    the buffers then makes every process hold exactly rank 0's model."""
    if not current().enabled:
        return
    dist = _dist()
    tensors = list(model.buffers()) if buffers_only else [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)
