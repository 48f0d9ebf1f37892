"""FSDP2 (``train.parallel: fsdp``): the model, its EMA and the optimizer state sharded over ranks.

With several processes, :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` on a
1-D device mesh to each block of ``model.blocks``, then to the root (stem, embedders, head). A
rank then holds 1/world of the parameters, gradients, AdamW moments and EMA; a block's full
parameters exist only while it runs (all-gathered before its forward and backward, freed
after). Routed blocks run on the gathered kept tokens: FSDP gathers parameters, not
activations, so a shorter token sequence changes nothing for it. Precision is the loop's
autocast (bf16 on CUDA), as under DDP: parameters, their all-gathers and the gradient
reduce-scatters stay float32, so the FSDP update equals the DDP one.

Checkpoint of an FSDP run (one directory, written atomically like any other)::

    sharded/            torch.distributed.checkpoint: model, EMA, optimizer (a file per rank)
    model.safetensors   full weights, gathered on rank 0 (sample, eval, init_from read these)
    ema.safetensors     full EMA weights, likewise
    state.pt            the loop state only (step, data position, clock, seed)
    config.json, meta.json

A resume reads ``sharded/``: every rank loads only its own shards. DCP reshards on load, so
the world size may change: tests cover 2 ranks -> 2, -> 4 and -> one process (which loads
the plain model, as DDP does). A DDP or
one-process checkpoint resumes under FSDP from its full files. Sample grids and evaluation get
the EMA as a plain module gathered for those calls (:func:`full_copy`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..config import Config
from ..errors import CheckpointError
from . import checkpoint as ckpt
from .dist import DistInfo

__all__ = [
    "full_copy",
    "load_full_optimizer",
    "load_sharded_checkpoint",
    "make_mesh",
    "plain_tensor",
    "save_sharded_checkpoint",
    "shard_model",
]

# Gathered on rank 0, on the CPU: what a checkpoint's safetensors files hold.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def make_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D mesh over all ranks (CUDA + NCCL, or CPU + gloo); the process group must exist."""
    return init_device_mesh(device.type, (world_size,))


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard each block of ``model.blocks``, then the rest of the model, over ``mesh``.

    One FSDP unit per block: only one block's full parameters are gathered at a time. The root
    unit holds what is left (patch/timestep/label embedders, final layer).

    Args:
        model: a backbone with an ``nn.ModuleList`` ``blocks``; sharded in place.
        mesh: the mesh of :func:`make_mesh`.

    Returns:
        ``model`` itself (its parameters are now DTensors).
    """
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    # Registered before fully_shard's own hooks, so it runs first: FSDP attaches its
    # pre-backward hook to the model's output, which an in-place op on a view would drop (it
    # warns for views). A backbone's output can be a view (unpatchify at patch size 1).
    model.register_forward_hook(_own_output)
    fully_shard(model, mesh=mesh)
    return model


def _own_output(module: nn.Module, args: Any, output: Any) -> Any:
    """The output as a tensor of its own when it is a view of another (a forward hook)."""
    if isinstance(output, Tensor) and output._is_view():
        return output.clone()
    return output


def plain_tensor(value: Tensor) -> Tensor:
    """A regular tensor of a (replicated) DTensor, e.g. the gradient norm of sharded gradients."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_copy(
    module: nn.Module,
    config: Config,
    device: torch.device,
    info: DistInfo,
    *,
    everywhere: bool,
) -> nn.Module | None:
    """A plain (unsharded) copy of a sharded model, for sample grids and evaluation.

    A collective: every rank calls it. The copy is built on the meta device, given memory on
    ``device`` and filled with the gathered weights; its buffers (fixed positional tables)
    come from ``module``, where FSDP keeps them whole.

    Args:
        module: a model sharded by :func:`shard_model` (the EMA).
        config: the run's config (to build the same architecture).
        device: where the copy lives.
        info: this rank.
        everywhere: every rank gets a copy (evaluation spreads generation over ranks); else
            rank 0 only (the sample grid), the others get None.

    Returns:
        The copy in eval mode without gradients, or None on ranks other than 0.
    """
    from .builders import build_from_config  # local: builders imports data and models

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    weights = get_model_state_dict(module, options=options)  # {} on ranks > 0 unless everywhere
    if not (everywhere or info.is_main):
        return None
    with torch.device("meta"):
        plain = build_from_config(config)
    plain.to_empty(device=device)
    plain.load_state_dict(weights)
    buffers = dict(module.named_buffers())  # same architecture: the same names
    with torch.no_grad():
        for name, mine in plain.named_buffers():
            mine.copy_(buffers[name])
    return plain.eval().requires_grad_(False)


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    loop_state: dict[str, Any],
    keep_last: int,
    info: DistInfo,
    group: torch_dist.ProcessGroup | None = None,
) -> Path | None:
    """Write the checkpoint of an FSDP run (layout: module docstring); every rank calls it.

    Rank 0 creates the temporary directory (named after its pid, as
    :func:`~tread.train.checkpoint.remove_stale_partials` expects) and tells the others; every
    rank writes its shards into ``sharded/`` there; rank 0 adds the gathered full weights and
    the small files and renames the directory into place. With several nodes, ``run_dir``
    must be on a file system that every node sees.

    Args:
        run_dir: the run directory.
        step: the step saved.
        model, ema, optimizer: the run's sharded model, EMA and optimizer.
        config: the resolved run config.
        loop_state: state.pt's ``loop`` (step, data position, clock, seed).
        keep_last: checkpoints to keep.
        info: this rank.
        group: a gloo group for the directory name (None: the default group).

    Returns:
        The checkpoint directory on rank 0; None on the others.
    """
    tmp = [ckpt.begin_checkpoint(run_dir, step) if info.is_main else None]
    torch_dist.broadcast_object_list(tmp, src=0, group=group)
    folder = Path(tmp[0])
    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards
    state = {"model": model_state, "ema": get_model_state_dict(ema), "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=folder / ckpt.SHARDED_DIR)
    weights = get_model_state_dict(model, options=_FULL_ON_RANK0)  # collective; {} on ranks > 0
    ema_weights = get_model_state_dict(ema, options=_FULL_ON_RANK0)
    if not info.is_main:
        return None
    training_state = {"loop": loop_state}  # the optimizer state lives in sharded/
    ckpt.write_checkpoint_files(folder, weights, ema_weights, training_state)
    meta = {"parallel": "fsdp", "world_size": info.world_size}
    return ckpt.finish_checkpoint(
        folder, run_dir, step, config=config, keep_last=keep_last, meta=meta
    )


def load_sharded_checkpoint(
    checkpoint: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load ``sharded/`` into a model, EMA and optimizer, sharded (any world size) or plain.

    A sharded model reads only its own shards; a plain one (one process, or DDP before it is
    wrapped: no process group yet) reads the whole tensors.

    Raises:
        CheckpointError: the files are missing, unreadable or do not fit the model.
    """
    folder = checkpoint / ckpt.SHARDED_DIR
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {
            "model": model_state,
            "ema": get_model_state_dict(ema),
            "optimizer": optimizer_state,
        }
        # No process group (one process, or DDP before it joins): this process reads it all,
        # as intended (DCP warns about it every time).
        alone = not torch_dist.is_initialized()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, checkpoint_id=folder, no_dist=alone)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        set_model_state_dict(ema, state["ema"])
    except (CheckpointException, Exception) as err:  # the former is a BaseException
        raise CheckpointError(
            f"sharded checkpoint {folder} cannot be loaded: {_first_problem(err)}"
        ) from None


def _first_problem(err: BaseException) -> str:
    """One line for an error; for DCP's, the first failing rank's exception (not its traceback)."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = next(iter(err.failures.items()))
        return f"rank {rank}: {_first_problem(cause)}"
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_full_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], file: Path
) -> None:
    """A whole optimizer state (a DDP or one-process run's) into the optimizer of a sharded model.

    ``optimizer.state_dict()`` names parameters by their index in ``model.parameters()``;
    FSDP keeps that order and the names, so the state is re-keyed by name and each rank keeps
    its shards (``set_optimizer_state_dict`` with a full state dict).

    Args:
        model: the sharded model.
        optimizer: its optimizer (over ``model.parameters()``).
        saved: state.pt's ``optimizer``.
        file: state.pt, named in errors.

    Raises:
        CheckpointError: the state does not fit the model.
    """
    names = [name for name, _ in model.named_parameters()]
    try:
        by_name = {
            "state": {names[index]: value for index, value in saved["state"].items()},
            "param_groups": [
                {**group, "params": [names[index] for index in group["params"]]}
                for group in saved["param_groups"]
            ],
        }
        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, by_name, options=full)
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"optimizer state in {file} does not fit the model: {err}") from None
