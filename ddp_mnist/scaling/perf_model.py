"""Why a data-parallel step takes as long as it does: a latency-bandwidth model of DDP's ring all-reduce,
fitted to a measured all-reduce sweep, and predictions of step time, throughput and efficiency.

Pure functions of numbers (no processes, no torch): the measurement lives in comm_bench.py, the
experiment in scale.py.

The model of one training step at world size N with per-rank batch b:

    step(N, b) = compute(b) x sharing(N) + allreduce(gradient, N)

- compute(b): forward + backward + optimizer step (and the batch's data) on one rank alone, fitted as
  a fixed cost per step plus a cost per sample, c0 + c1 x b, from timings at several per-rank batches;
- sharing(N) = max(1, N x threads per rank / cores): ranks that share cores slow each other's compute.
  On this machine the measurement shows it; beyond the machine, one rank per device (sharing 1);
- allreduce: DDP all-reduces the gradient in buckets of bucket_cap_mb (25 MB by default; the MLP's
  2.1 MB gradient is one bucket). A ring all-reduce of n bytes over N ranks moves 2(N-1)/N x n bytes
  through each link in 2(N-1) latency-bound steps:  t(n, N) = 2(N-1) x latency + 2(N-1)/N x n / bandwidth.
  A one-bucket model's all-reduce starts after backward ends, so nothing overlaps it: the model assumes
  no overlap (an upper bound on step time for models with several buckets). The train loop adds its own
  tiny all-reduces (the stop-signal check about every 0.1 s of steps on the CPU and every 50 steps on CUDA,
  the loss check every log_every steps): `control` per step, each costing about the ring's latency.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

MB = 2**20


DEFAULT_BUCKET_CAP_MB = 25.0  # DDP's default bucket_cap_mb


CONTROL_BYTES = 8  # the train loop's own small all-reduces (stop-signal check, loss check): latency only


@dataclasses.dataclass(frozen=True)
class Link:
    """One ring link: the per-hop latency (s) and bandwidth (bytes/s)."""

    latency_s: float
    bandwidth_Bps: float

    @classmethod
    def named(cls, gbps: float, latency_us: float) -> Link:
        """A target cluster's link, e.g. 400 Gb/s InfiniBand with 10 us latency: Link.named(400, 10)."""
        if not (gbps > 0 and latency_us >= 0):
            raise ValueError(f"a link needs a positive bandwidth and a latency >= 0, got {gbps} Gb/s, {latency_us} us")
        return cls(latency_us * 1e-6, gbps * 1e9 / 8)


@dataclasses.dataclass(frozen=True)
class Compute:
    """Compute time of one step on one rank alone: fixed + per_sample x per-rank batch (seconds)."""

    fixed_s: float
    per_sample_s: float

    def seconds(self, rank_batch: float) -> float:
        return self.fixed_s + self.per_sample_s * rank_batch


# ---------------------------------------------------------------------- the ring all-reduce
def ring_factor(world_size: int) -> float:
    """Bytes each rank sends per byte reduced in a ring all-reduce: 2(N-1)/N (nccl-tests' bus factor)."""
    return 2 * (world_size - 1) / world_size


def ring_allreduce_seconds(nbytes: float, world_size: int, link: Link) -> float:
    if world_size <= 1:
        return 0.0
    return 2 * (world_size - 1) * link.latency_s + ring_factor(world_size) * nbytes / link.bandwidth_Bps


def algbw(nbytes: float, seconds: float) -> float:
    """nccl-tests' algorithm bandwidth: the message size over the time (bytes/s)."""
    return nbytes / seconds


def busbw(algbw_Bps: float, world_size: int) -> float:
    """nccl-tests' bus bandwidth: what each link carried, comparable across world sizes (bytes/s)."""
    return algbw_Bps * ring_factor(world_size)


def buckets(gradient_bytes: float, bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB) -> list[float]:
    """The sizes of DDP's gradient buckets (bytes): full buckets of bucket_cap_mb, then the rest."""
    cap = bucket_cap_mb * MB
    if gradient_bytes <= 0:
        return []
    full, rest = divmod(gradient_bytes, cap)
    return [cap] * int(full) + ([rest] if rest else [])


def lowrank_elements(
    shapes: Iterable[tuple[int, ...]], rank: int, min_compression_rate: float = 2.0
) -> tuple[int, int, int]:
    """PowerSGD's messages for these gradient shapes: (uncompressed elements, P elements, Q elements). A
    tensor of 2+ dimensions is a matrix (first dimension x the rest) sent as P (rows x r) and Q (cols x r)
    when that is min_compression_rate times smaller (torch's PowerSGD rule); the rest goes uncompressed."""
    plain = p = q = 0
    for shape in shapes:
        numel = math.prod(shape)
        if len(shape) < 2:
            plain += numel
            continue
        rows, cols = shape[0], numel // shape[0]
        r = min(rank, rows, cols)
        if (rows + cols) * r * min_compression_rate < rows * cols:
            p, q = p + rows * r, q + cols * r
        else:
            plain += numel
    return plain, p, q


def step_messages(
    gradient_bytes: float,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    comm_hook: str = "none",
    strategy: str = "ddp",
    lowrank_bytes: tuple[float, float, float] | None = None,
    control: float = 0.0,
    unit_bytes: Sequence[float] | None = None,
) -> list[tuple[float, float]]:
    """One step's communication as ring all-reduce equivalents: (bytes, how many per step).
    - DDP: one all-reduce per bucket of the fp32 gradient; fp16/bf16 hooks send each bucket at half size;
      PowerSGD sends per bucket its uncompressed part, then P, then Q (lowrank_bytes, over all buckets);
    - zero1 adds the updated parameters' broadcast from their owners, an all-gather: half an all-reduce
      (the fp32 parameters are as large as the fp32 gradient);
    - fsdp, per sharded layer (unit_bytes: strategy.fsdp_units; else one unit of all the parameters),
      all-gathers its parameters twice (forward, and backward after resharding) and reduce-scatters its
      gradient: three half all-reduces, each with its own ring latency (1.5 all-reduces per layer);
    - the train loop's control all-reduces (CONTROL_BYTES each)."""
    if strategy == "fsdp":
        messages = [(unit, 1.5) for unit in (unit_bytes or [gradient_bytes])]
    else:
        sizes = buckets(gradient_bytes, bucket_cap_mb)
        if comm_hook in ("fp16", "bf16"):
            messages = [(b / 2, 1.0) for b in sizes]
        elif comm_hook == "powersgd" and lowrank_bytes is not None:
            share = 1 / max(len(sizes), 1)  # each bucket carries its share of the three messages
            messages = [(x * share, float(len(sizes))) for x in lowrank_bytes if x]
        else:
            messages = [(b, 1.0) for b in sizes]
        if strategy == "zero1":
            messages.append((gradient_bytes, 0.5))
    if control:
        messages.append((CONTROL_BYTES, control))
    return messages


def fit_link(points: Iterable[tuple[float, int, float]]) -> Link:
    """Least squares of t = latency x 2(N-1) + (1/bandwidth) x 2(N-1)/N x bytes over (bytes, N, seconds)
    points with N > 1, both terms >= 0 (non-negative least squares, two unknowns in closed form). Noise can
    push one term below 0 (small messages slower than large ones on a busy machine): it is then 0 and the
    other is fitted alone, a bandwidth of inf meaning that the sizes measured show no bandwidth limit."""
    rows = [(2.0 * (n - 1), ring_factor(n) * b, t) for b, n, t in points if n > 1]
    if len(rows) < 2:
        raise ValueError("fitting a link needs all-reduce timings at two or more sizes, at world size 2 or more")
    saa = sum(a * a for a, _, _ in rows)
    sab = sum(a * b for a, b, _ in rows)
    sbb = sum(b * b for _, b, _ in rows)
    sat = sum(a * t for a, _, t in rows)
    sbt = sum(b * t for _, b, t in rows)
    det = saa * sbb - sab * sab
    if det <= 0:
        raise ValueError("the all-reduce timings do not separate latency from bandwidth: time several sizes")
    latency = (sat * sbb - sbt * sab) / det
    inverse_bw = (saa * sbt - sab * sat) / det
    if latency < 0:  # the bandwidth alone, through the origin
        latency, inverse_bw = 0.0, max(sbt / sbb, 0.0)
    elif inverse_bw < 0:  # the latency alone
        latency, inverse_bw = max(sat / saa, 0.0), 0.0
    return Link(latency, 1.0 / inverse_bw if inverse_bw > 0 else math.inf)


def interpolate_seconds(sweep: Sequence[tuple[float, float]], nbytes: float) -> float:
    """A measured all-reduce time at nbytes, interpolated log-log between the sweep's (bytes, seconds)
    points (extrapolated from the nearest two outside them)."""
    pts = sorted(sweep)
    if not pts:
        raise ValueError("an empty all-reduce sweep")
    if len(pts) == 1:
        return pts[0][1] * nbytes / pts[0][0]
    i = next((k for k in range(1, len(pts)) if pts[k][0] >= nbytes), len(pts) - 1)
    (b0, t0), (b1, t1) = pts[i - 1], pts[i]
    w = (math.log(nbytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
    return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))


# ---------------------------------------------------------------------- compute
def fit_compute(points: Iterable[tuple[float, float]]) -> Compute:
    """compute(b) = fixed + per_sample x b, least squares over (per-rank batch, seconds) points. One point:
    all of it per sample (no fixed part can be told apart)."""
    pts = list(points)
    if not pts:
        raise ValueError("fitting compute needs at least one timing")
    batches = {b for b, _ in pts}
    if len(batches) == 1:
        b = pts[0][0]
        return Compute(0.0, sum(t for _, t in pts) / len(pts) / b)
    n = len(pts)
    mb, mt = sum(b for b, _ in pts) / n, sum(t for _, t in pts) / n
    slope = sum((b - mb) * (t - mt) for b, t in pts) / sum((b - mb) ** 2 for b, _ in pts)
    fixed = mt - slope * mb
    if fixed < 0:  # noise: through the origin
        return Compute(0.0, sum(b * t for b, t in pts) / sum(b * b for b, _ in pts))
    if slope < 0:  # timings that fall with the batch: a fixed cost only
        return Compute(mt, 0.0)
    return Compute(fixed, slope)


def sharing(world_size: int, threads_per_rank: int, cores: int) -> float:
    """How much ranks that share cores slow each other's compute: max(1, N x threads / cores)."""
    return max(1.0, world_size * threads_per_rank / cores)


# ---------------------------------------------------------------------- predictions
@dataclasses.dataclass(frozen=True)
class Machine:
    """What the prediction needs: one rank's compute, the link, the gradient and its buckets, and how
    many cores the ranks share (None: one device per rank, no sharing)."""

    compute: Compute
    link: Link
    gradient_bytes: float
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    threads_per_rank: int = 1
    cores: int | None = None
    control: float = 0.0  # the train loop's small all-reduces per step
    messages: tuple[tuple[float, float], ...] | None = None  # step_messages(); None: the gradient's buckets + control
    # The loop's own cost per step outside the timed compute and communication (Python, the scheduler, the
    # data's indexing, DDP's reducer): measured at 1 rank as step - compute, the same at every world size.
    overhead_s: float = 0.0

    def step_messages(self) -> list[tuple[float, float]]:
        if self.messages is not None:
            return list(self.messages)
        return step_messages(self.gradient_bytes, self.bucket_cap_mb, control=self.control)


@dataclasses.dataclass(frozen=True)
class Prediction:
    world_size: int
    global_batch: int
    rank_batch: float
    compute_s: float
    comm_s: float
    step_s: float
    samples_per_second: float
    efficiency: float  # against the same model's 1-rank prediction (weak: same per-rank batch)


def predict_step(m: Machine, world_size: int, rank_batch: float, alone_s: float | None = None) -> tuple[float, float]:
    """(compute, all-reduce) seconds of one step; compute includes the loop's fixed overhead. `alone_s`: one
    rank's compute at this batch as measured, in place of the fit."""
    share = sharing(world_size, m.threads_per_rank, m.cores) if m.cores else 1.0
    compute = (m.compute.seconds(rank_batch) if alone_s is None else alone_s) * share + m.overhead_s
    comm = sum(count * ring_allreduce_seconds(nbytes, world_size, m.link) for nbytes, count in m.step_messages())
    return compute, comm


def predict(m: Machine, world_size: int, global_batch: int, base_global_batch: int | None = None) -> Prediction:
    """Step time, throughput and efficiency at world size N with this global batch. Efficiency is
    throughput(N) / (N x throughput(1)), throughput(1) at base_global_batch (strong: the same global
    batch; weak: the per-rank batch, i.e. global_batch / N)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch < world_size:
        raise ValueError(f"global batch {global_batch} gives less than one sample to each of {world_size} ranks")
    rank_batch = global_batch / world_size
    compute, comm = predict_step(m, world_size, rank_batch)
    step = compute + comm
    tput = global_batch / step
    base_batch = base_global_batch if base_global_batch is not None else global_batch
    base_tput = base_batch / sum(predict_step(m, 1, base_batch))
    return Prediction(
        world_size,
        global_batch,
        rank_batch,
        compute,
        comm,
        step,
        tput,
        parallel_efficiency(tput, base_tput, world_size),
    )


def weak_scaling(m: Machine, rank_batch: int, sizes: Iterable[int]) -> list[Prediction]:
    """Per-rank batch fixed: the global batch grows with N."""
    return [predict(m, n, rank_batch * n, rank_batch) for n in sizes]


def strong_scaling(m: Machine, global_batch: int, sizes: Iterable[int]) -> list[Prediction]:
    """Global batch fixed: world sizes with at least one sample per rank (N <= global batch)."""
    return [predict(m, n, global_batch, global_batch) for n in sizes if n <= global_batch]


def powers_of_two(up_to: int) -> list[int]:
    """1, 2, 4, ... up to and including up_to (also when it is not a power of two)."""
    sizes, n = [], 1
    while n < up_to:
        sizes.append(n)
        n *= 2
    return sizes + [up_to]


def parallel_efficiency(
    throughput: float | None, base_throughput: float | None, world_size: int, base_world_size: int = 1
) -> float | None:
    """throughput(N) / (throughput(N0) x N / N0): 1.0 is linear scaling from N0 ranks. None when either
    throughput is unknown (or zero)."""
    if not (throughput and base_throughput):
        return None
    return throughput / base_throughput * base_world_size / world_size


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: +0.10 means the prediction is 10% above the measurement."""
    return (predicted - measured) / measured


def overlap(compute_s: float, comm_s: float, step_s: float) -> tuple[float, float]:
    """(overlap, other) of a measured step: compute + comm - step, clamped to [0, min(compute, comm)] (only
    communication can hide behind compute); `other` is the part of the step neither explains (data,
    Python, waiting on a slower rank), >= 0."""
    raw = compute_s + comm_s - step_s
    hidden = min(max(raw, 0.0), min(compute_s, comm_s))
    return hidden, max(step_s - (compute_s + comm_s - hidden), 0.0)
