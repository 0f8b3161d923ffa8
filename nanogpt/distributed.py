"""Training on several processes under torchrun: set-up, DDP and FSDP2 wrapping, rank-aware helpers.

torchrun starts one process per GPU (or several on the CPU, with gloo) and sets RANK, LOCAL_RANK and
WORLD_SIZE. DDP replicates the model and all-reduces gradients; FSDP2 (`fully_shard`) shards weights,
gradients and optimizer state over the processes and gathers each block's weights just before it runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from nanogpt.device import DTYPES, resolve_device
from nanogpt.errors import UserError
from nanogpt.model import GPT


@dataclass(frozen=True)
class Place:
    """Where this process trains: its device and its rank among `world` processes (1 without torchrun)."""

    device: str
    rank: int = 0
    world: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step on this rank
    fsdp: bool = False  # the model is sharded over the ranks (FSDP2) rather than replicated (DDP)
    torchrun: bool = False  # started by torchrun: a process group is up (even for one process)
    cpu_group: Any = None  # a gloo group over the same processes, for small flags that need no GPU sync

    @property
    def master(self) -> bool:  # rank 0 prints, logs and writes checkpoints
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def start_processes(device: str, backend: str, gradient_accumulation_steps: int, fsdp: bool) -> Place:
    """Where this process trains. Under torchrun: its GPU (cuda:LOCAL_RANK), the process group (nccl on
    GPUs, gloo on the CPU, unless `backend` says), and its share of the step's micro-batches."""
    if not under_torchrun():
        return Place(resolve_device(device), grad_accum=gradient_accumulation_steps)
    import torch.distributed as dist

    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world:
        raise UserError(
            f"--gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the number of "
            f"processes ({world}): the micro-batches are shared among them."
        )
    backend = backend if backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend=backend)
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo")  # None: the default group
    return Place(device, rank, world, gradient_accumulation_steps // world, fsdp, torchrun=True, cpu_group=cpu_group)


def end_processes(at: Place, together: bool) -> None:
    """Tear the process group down, the processes waiting for each other first: one that tore its side down
    while another still exchanged its last messages could make gloo abort that one ("terminate called
    without an active exception"). together: every process reached the same end (the run's, or the same
    error), so the wait is short; otherwise another may never come, and each leaves after a few seconds."""
    if at.torchrun:
        import datetime

        import torch.distributed as dist

        wait = datetime.timedelta(seconds=60 if together else 5)
        with contextlib.suppress(RuntimeError):  # a process that never came: leave anyway
            dist.monitored_barrier(group=at.cpu_group, timeout=wait)
        dist.destroy_process_group()


def fail_together(at: Place, failure: str | None) -> None:
    """End every process when any met `failure` (a message; None: it succeeded) in a step each may fail on
    its own, such as writing its part of a checkpoint. A collective: every rank calls it, so none is left
    waiting in the next collective for one that gave up. The master raises the first failure, in rank
    order, as a UserError (one message); the others exit with the same status 2, quietly."""
    if at.world == 1:
        if failure is not None:
            raise UserError(failure)
        return
    import torch.distributed as dist

    failures: list[Any] = [None] * at.world
    dist.all_gather_object(failures, failure, group=at.cpu_group)
    first = next(((rank, f) for rank, f in enumerate(failures) if f is not None), None)
    if first is None:
        return
    if at.master:
        raise UserError(f"process {first[0]} of {at.world}: {first[1]}" if first[0] else first[1])
    raise SystemExit(2)  # the master says what went wrong, once


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(e: BaseException, at: Place) -> UserError | None:
    """The message for a collective that failed because another process of the run ended (killed, out of
    memory, or its own error): gloo and NCCL say so in their own words, as a RuntimeError (DistError in
    newer PyTorch). None for any other error."""
    if at.world == 1 or not isinstance(e, RuntimeError):
        return None
    import torch.distributed as dist

    cause = next((words for words in LOST_PEER if words in str(e)), None)
    if cause is None and not isinstance(e, dist.DistError):
        return None
    return UserError(
        f"process {at.rank} of {at.world} stopped because another process of this run ended "
        f"({cause or type(e).__name__}). Its own message above, or torchrun's report of its exit code (-9: "
        "killed, for instance by the out-of-memory killer), says why. The checkpoints saved so far are intact: "
        "resume with --init_from=resume."
    )


def shard(model: GPT, at: Place, dtype: str) -> None:
    """FSDP2: each block, then the rest (embeddings, final norm, head), sharded over all ranks. Mixed
    precision through its policy: blocks compute in bfloat16 when asked, while the float32 shards stay the
    master weights and gradients are reduced in float32. A model built on the meta device (no memory) is
    materialised after: each process allocates only its shards, initialised as GPT() would (materialise)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # copies of the layers as built (on meta: free), taken before fully_shard turns their weights into DTensors
    built = constructed_layers(model) if any(p.is_meta for p in model.parameters()) else None
    mesh = init_device_mesh(at.device.split(":")[0], (at.world,))
    policy = MixedPrecisionPolicy(param_dtype=None if dtype == "float32" else DTYPES[dtype], reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if built is not None:
        materialise(model, built, at.device)


def constructed_layers(model: GPT) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """The layers that initialise themselves as they are built (torch's Linear, Embedding, LayerNorm,
    RMSNorm: reset_parameters), each with a copy (on meta: free), in the order GPT() built them, which is
    the order they are registered in. Linear and Embedding drew random numbers there, which GPT.init_steps
    then replaced; the norms keep their ones and zeros. materialise redoes both."""
    return [
        (m, copy.deepcopy(m))
        for m in model.modules()
        if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))
    ]


@torch.no_grad()
def materialise(model: GPT, built: list[tuple[torch.nn.Module, torch.nn.Module]], device: str) -> None:
    """Allocate the shards of a sharded model built on the meta device and give them the weights GPT()
    gives on the CPU after the same torch.manual_seed: every process draws the same random numbers in the
    same order, one whole parameter at a time on the CPU, and keeps its part of each. The peak is one
    layer, not the model. Every process must start from the same generator state."""
    model.to_empty(device=device)
    written = set()
    while built:  # the layers' own initialisation as GPT() built them, a layer at a time
        layer, twin = built.pop(0)
        twin.to_empty(device="cpu").reset_parameters()
        for name, p in layer.named_parameters(recurse=False):
            _set_shard(p, getattr(twin, name))
            written.add(id(p))
    for p, init in model.init_steps():  # then GPT's, drawing after them as in GPT()
        whole = torch.empty(p.shape, dtype=p.dtype)
        init(whole)
        _set_shard(p, whole)
        written.add(id(p))
    unset = [n for n, p in model.named_parameters() if id(p) not in written]
    if unset:  # to_empty left them as whatever the memory held
        raise RuntimeError(f"bug: materialise initialised neither layer nor step for {unset}")
    model.init_buffers(device)  # RoPE's tables, left uninitialised by to_empty too


def _set_shard(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this process's part of `whole`, the full value of parameter `p`, into p (a DTensor's shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):  # src_data_rank=None: each process splits its own copy, no communication
        whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p = p.to_local()
    p.copy_(whole)


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing: each block keeps only its input for backward and recomputes the rest
    (Chen et al. 2016), with the same random numbers for dropout."""
    import torch.utils.checkpoint

    for block in model.transformer.h:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def gather_rng_states(state: dict[str, Any], at: Place) -> list[dict[str, Any]]:
    """Every process's random states (rng_state), rank by rank (a collective: all ranks must call it);
    [state] alone."""
    if at.world == 1:
        return [state]
    import torch.distributed as dist

    # as torch.save bytes: all_gather_object's own pickling of tensors fails to load back in some versions
    buf = io.BytesIO()
    torch.save(state, buf)
    states: list[Any] = [None] * at.world
    dist.all_gather_object(states, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in states]


def rng_to_restore(ckpt: dict[str, Any], at: Place) -> dict[str, Any] | None:
    """This process's random states in a resume checkpoint. With DDP, each rank gets its own when the
    checkpoint holds them for the same number of processes (evaluation checkpoints do); otherwise the
    ranks' streams start afresh: the run is correct, but not bit-identical to an uninterrupted one."""
    if at.world == 1:
        return ckpt.get("rng")
    ranks = ckpt.get("rng_ranks")
    if ranks and len(ranks) == at.world:
        return ranks[at.rank]
    if at.master:
        held = f"{len(ranks)} processes" if ranks else "one process"
        print(
            f"warning: the checkpoint holds the random states of {held}, and this run has {at.world}; each "
            "process's random streams start afresh, so the resumed run is correct but not bit-identical.",
            file=sys.stderr,
        )
    return None


def wrap_model(model: GPT, compile: bool | None, at: Place) -> torch.nn.Module:
    """The model as the loop calls it: compiled (--compile; None: on CUDA without FSDP) and, with several
    processes, wrapped by DDP."""
    if compile if compile is not None else at.device.startswith("cuda") and not at.fsdp:
        if at.master:
            print("compiling the model... (takes a ~minute)")
        model = torch.compile(model)
    if at.world > 1 and not at.fsdp:  # FSDP wrapped the model already (shard)
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[int(at.device.split(":")[1])] if at.device.startswith("cuda") else None)
    return model
