"""PowerSGD's state as plain tensors: each rank's error feedback, the warm-start Q, its step counter and
RNG, saved per parameter, so that `torch.load(weights_only=True)` reads them and DDP's bucket layout does
not matter (strategy.py registers the hook)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------- PowerSGD
Layout = list  # [(parameter name, shape)] in a DDP bucket's order


class PowerSGD:
    """torch's PowerSGD hook and state, with the state saved per PARAMETER (tensors, numbers, names).

    torch keys the error feedback and the warm-start Q by bucket, laid out in the bucket's parameter order,
    and that order changes: DDP builds its first buckets in definition order and rebuilds them after the
    first step in the order the gradients became ready, and a resumed process starts over from the first
    ones. The hook here notes each bucket's layout; when a bucket's layout is not the one its state was
    made in, the state is moved parameter by parameter into the new layout (a checkpoint's state arrives
    the same way). P needs no saving: each step computes it from Q before reading it.
    """

    def __init__(self, model: nn.Module, rank: int, start_step: int, seed: int):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        self.state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start_step, random_seed=seed
        )
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.layouts: dict[int, Layout] = {}  # bucket index -> the layout its state is in
        self.carry: dict[str, dict[str, torch.Tensor]] = {"error": {}, "q": {}}  # per parameter, to be placed

        def hook(state, bucket):  # (no annotations: DDP checks them, and this module's are strings)
            self.place(bucket.index(), [(self.names[id(p)], tuple(p.shape)) for p in bucket.parameters()])
            return powerSGD_hook.powerSGD_hook(state, bucket)

        self.hook = hook

    def place(self, index: int, layout: Layout) -> None:
        known = self.layouts.get(index)
        if known == layout:
            return
        if known is not None:  # the buckets were rebuilt: take every bucket's state apart
            for key, per_param in self.split().items():
                self.carry[key].update(per_param)
            self.forget_buckets()
        self.join(index, layout)
        self.layouts[index] = layout

    def forget_buckets(self) -> None:
        """Drop every bucket's state and layout (what is still needed waits in `carry`, per parameter)."""
        self.layouts.clear()
        for d in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict):
            d.clear()

    def compressed(self, layout: Layout) -> list[tuple[str, int, int, int]]:
        """(name, n, m, rank) of the tensors the hook compresses, in the order it lays out P and Q."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

        groups: dict[tuple[int, int], list] = {}
        for name, shape in layout:
            n, m = shape[0], math.prod(shape[1:])
            r = min(n, m, self.state.matrix_approximation_rank)
            if _should_compress(n, m, r, self.state.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((name, n, m, r))
        return [t for group in groups.values() for t in group]

    def split(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state per parameter name: its error feedback and its Q."""
        out: dict[str, dict[str, torch.Tensor]] = {"error": {}, "q": {}}
        for index, layout in self.layouts.items():
            if index in self.state.error_dict:
                pieces = self.state.error_dict[index].split([math.prod(shape) for _, shape in layout])
                out["error"].update({name: t.clone() for (name, _), t in zip(layout, pieces)})
            if index in self.state.q_memory_dict:
                parts = self.compressed(layout)
                pieces = self.state.q_memory_dict[index].split([m * r for _, _, m, r in parts])
                out["q"].update({name: t.clone() for (name, *_), t in zip(parts, pieces)})
        return out

    def join(self, index: int, layout: Layout) -> None:
        """Lay out carried per-parameter state as bucket `index`'s (when it holds all of that bucket)."""
        error, q = self.carry["error"], self.carry["q"]
        if layout and all(name in error for name, _ in layout):
            self.state.error_dict[index] = torch.cat([error.pop(name).flatten() for name, _ in layout])
        parts = self.compressed(layout)
        if parts and all(name in q for name, *_ in parts):
            self.state.q_memory_dict[index] = torch.cat([q.pop(name) for name, *_ in parts])
            qs = self.state.q_memory_dict[index]
            self.state.p_memory_dict[index] = qs.new_empty(sum(n * r for _, n, _, r in parts))

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        per_param = self.split()
        for key in per_param:
            per_param[key].update(self.carry[key])  # state not placed yet (no step since a resume)
        _, keys, pos, has_gauss, cached = s.rng.get_state(legacy=True)  # the legacy tuple: (name, keys, ...)
        return {
            "hook": "powersgd",
            "rank": s.matrix_approximation_rank,
            "iter": s.iter,
            **per_param,
            "rng": {
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "numel_before": s.total_numel_before_compression,
            "numel_after": s.total_numel_after_compression,
            "next_stats_report": s.next_stats_report,
        }

    def load_state_dict(self, saved: dict[str, Any], device: torch.device) -> None:
        s = self.state
        s.iter = saved["iter"]
        self.forget_buckets()
        self.carry = {key: {name: t.to(device) for name, t in saved[key].items()} for key in ("error", "q")}
        rng = saved["rng"]
        s.rng.set_state(
            ("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached_gaussian"])
        )
        s.total_numel_before_compression = saved["numel_before"]
        s.total_numel_after_compression = saved["numel_after"]
        s.next_stats_report = saved["next_stats_report"]
