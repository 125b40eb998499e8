"""Small collectives every rank calls in the same order, and "rank 0 does it, every rank gets it"."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddp_mnist.errors import ConfigError, MainRankError


def all_reduce(values: list[float], device: torch.device, ops: tuple[str, ...]) -> list[float]:
    """Reduce a few numbers over all ranks, each with its op (`sum` or `max`); float64 keeps counts exact.
    One collective per distinct op. A host-device sync."""
    out = list(values)
    for op in sorted(set(ops)):
        idx = [i for i, o in enumerate(ops) if o == op]
        tensor = torch.tensor([values[i] for i in idx], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        for i, v in zip(idx, tensor.tolist()):
            out[i] = v
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks."""
    return all_reduce(values, device, ops=("sum",) * len(values))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on at least one rank (one tiny all-reduce)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def is_main_rank() -> bool:
    """Rank 0 of the process group, or the only process when there is none."""
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_from_main(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj) -> list | None:
    """Every rank's object, as a list on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if is_main_rank() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_on_main(fn, *args):
    """Run `fn` on rank 0 only; its (small, picklable) result reaches every rank in one broadcast, and so
    does its error, whatever its type (no rank left waiting). Rank 0 re-raises its own exception; the others
    raise ConfigError for a configuration error (the same clear message and exit status), else
    MainRankError naming rank 0's exception."""
    result, error = None, None
    if is_main_rank():
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001 - any error must reach the other ranks before it is raised
            error = e
    result, told = broadcast_from_main((result, None if error is None else (type(error).__name__, str(error))))
    if error is not None:
        raise error
    if told is not None:
        kind, message = told
        raise ConfigError(message) if kind == "ConfigError" else MainRankError(f"rank 0 failed: {kind}: {message}")
    return result
