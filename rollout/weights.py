"""The trainer's weights, whole, on every process: what the engine copies from a sharded model.

Under DDP every process holds the whole model. Under DeepSpeed ZeRO-3 each parameter is an empty
placeholder (it carries a ``ds_id``) whose data lies in shards across the processes, and under FSDP2 it
is a ``DTensor`` sharded the same way. ``Accelerator.get_state_dict`` gathers such a model on process 0
alone, for saving; every process's engine needs all of it. So each parameter is gathered in turn, on
every process, and held whole only while the engine copies it: the whole model is never gathered at once.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def is_sharded(model: torch.nn.Module) -> bool:
    """Are the model's parameters split across processes (ZeRO-3 or FSDP2)?"""
    return any(_zero3(p) or isinstance(p, DTensor) for p in model.parameters())


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for each parameter of ``model``, in ``named_parameters`` order.

    On a sharded model each step is a collective: every process must read every parameter, in the same
    order, and a tensor is valid only until the next one is read (its gathered copy is then released).
    """
    for name, param in model.named_parameters():
        if _zero3(param):
            import deepspeed    # only a ZeRO-3 model has such parameters

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        elif isinstance(param, DTensor):
            yield name, param.full_tensor()
        else:
            yield name, param.detach()


@torch.no_grad()
def copy_parameters(model: torch.nn.Module, source: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (name, tensor) pairs into ``model``'s parameters of those names; every parameter must be given."""
    own = dict(model.named_parameters())
    missing = set(own)
    for name, tensor in source:
        if name in own:
            own[name].copy_(tensor)
            missing.discard(name)
    if missing:
        names = sorted(missing)
        raise KeyError(f"the source has no {names[:3]} (and {max(len(names) - 3, 0)} more)")


def unsharded_copy(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A model of ``model``'s class and config holding its whole weights on ``device``, in ``dtype``.

    Built empty on the meta device and filled one gathered parameter at a time, so no process ever holds
    more than this copy and one whole parameter of the sharded model. A collective, as ``full_parameters``.
    """
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses the model's class
    with torch.device("meta"):
        shell = cls(model.config)
    shell = shell.to(dtype=dtype).to_empty(device=device)
    copy_parameters(shell, full_parameters(model))
    with torch.no_grad():
        for name, buffer in model.named_buffers():     # neither ZeRO-3 nor FSDP2 shards buffers
            shell.get_buffer(name).copy_(buffer)
    return shell.eval()
