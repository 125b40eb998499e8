"""`--deterministic`: the same job gives the same parameters, bit for bit, on any device, also where the
fastest kernels are not (cuBLAS's split reductions, cuDNN's benchmarked algorithms, atomics in some CUDA
backward kernels). On the CPU ddp-mnist's training is deterministic without it; the switch then costs
little (docs/speed.md, measured).
"""

from __future__ import annotations

import os
import re

import torch

from ddp_mnist.errors import ConfigError

# torch's own words when an operation has no deterministic implementation (torch.use_deterministic_algorithms).
_NO_DETERMINISTIC_VERSION = re.compile(r"^(\S+) does not have a deterministic implementation")


def make_deterministic() -> None:
    """Every switch the training needs, set before CUDA starts (call it before the first CUDA operation)."""
    # cuBLAS reads it when it initializes: a fixed workspace makes its reductions reproducible.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # an op with no deterministic version raises (see below)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # benchmarking picks algorithms by timing: another run may differ
    torch.backends.mkldnn.deterministic = True  # type: ignore[assignment]  # oneDNN (CPU); typed as a ContextProp


def explain_nondeterministic(error: BaseException) -> ConfigError | None:
    """torch's error for an operation with no deterministic version, as a clear error naming it; else None."""
    match = _NO_DETERMINISTIC_VERSION.match(str(error))
    if not isinstance(error, RuntimeError) or match is None:
        return None
    return ConfigError(
        f"--deterministic: {match[1]} has no deterministic implementation on this device; run without "
        f"--deterministic, or choose a setting that avoids it (another --model, --precision or --device)"
    )
