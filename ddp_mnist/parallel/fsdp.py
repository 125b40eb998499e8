"""FSDP2 helpers: the units sharded, and the model and optimizer states gathered FULL (and loaded back)
so that a checkpoint looks like DDP's at any world size."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddp_mnist.parallel.collectives import is_main_rank


# ---------------------------------------------------------------------- FSDP2
def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The layers FSDP2 shards one by one: every module below the root that holds parameters itself. Each is one
    all-gather in forward, one in backward and one reduce-scatter of its gradient per step (perf_model.py)."""
    return [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard every layer that holds parameters, then the root (which takes what is left)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in fsdp_units(model):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_fsdp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """The full (unsharded) model and optimizer states on rank 0, on the CPU (collective); (None, None) elsewhere.
    The optimizer's comes keyed by parameter name: it is turned into DDP's parameter-index form."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main_rank():
        return None, None
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    optim: dict[str, Any] = dict(optim_sd)  # its "state" and "param_groups"
    return model_sd, {
        "state": {index[name]: value for name, value in optim["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]],
    }


def load_full_fsdp_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Every rank holds the full states (read from the checkpoint): each keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    names = [name for name, _ in model.named_parameters()]
    by_name: dict[str, Any] = {
        "state": {names[int(i)]: value for i, value in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim_sd["param_groups"]],
    }
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
