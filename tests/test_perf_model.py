"""The scaling model's arithmetic (perf_model.py), with no processes: the ring formula, the fits, the
core-sharing rule, the strong-scaling cap, and the decomposition's clamping."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ddp_mnist.scaling import perf_model as pm

LINK = pm.Link(latency_s=20e-6, bandwidth_Bps=5e9)


def test_ring_allreduce_formula():
    # 2(N-1) latencies + 2(N-1)/N of the bytes per link; one rank communicates nothing.
    assert pm.ring_allreduce_seconds(1e6, 1, LINK) == 0.0
    assert pm.ring_allreduce_seconds(1e6, 2, LINK) == pytest.approx(2 * 20e-6 + 1e6 / 5e9)
    assert pm.ring_allreduce_seconds(1e6, 4, LINK) == pytest.approx(6 * 20e-6 + 1.5 * 1e6 / 5e9)
    assert pm.busbw(pm.algbw(8e6, 1e-3), 8) == pytest.approx(8e9 * 2 * 7 / 8)
    named = pm.Link.named(400, 10)  # 400 Gb/s, 10 us
    assert named.latency_s == pytest.approx(10e-6) and named.bandwidth_Bps == pytest.approx(50e9)


def test_buckets_follow_bucket_cap():
    grad = 523_326 * 4  # the MLP's fp32 gradient: ~2.1 MB, one bucket at DDP's 25 MB
    assert pm.buckets(grad) == [grad]
    assert pm.buckets(60 * pm.MB, 25) == [25 * pm.MB, 25 * pm.MB, 10 * pm.MB]

    # Each bucket pays the ring's latency: three buckets cost two more latency terms than one.
    def gradient_allreduce_seconds(bucket_cap_mb: float) -> float:
        return sum(
            count * pm.ring_allreduce_seconds(nbytes, 4, LINK)
            for nbytes, count in pm.step_messages(60 * pm.MB, bucket_cap_mb)
        )

    one, three = gradient_allreduce_seconds(100), gradient_allreduce_seconds(25)
    assert three - one == pytest.approx(2 * 6 * LINK.latency_s)


def test_fit_recovers_latency_and_bandwidth_from_synthetic_points():
    sizes = [4096 * 4**k for k in range(8)]  # 4 KB .. 64 MB
    points = [(b, n, pm.ring_allreduce_seconds(b, n, LINK)) for n in (2, 3, 4) for b in sizes]
    fitted = pm.fit_link(points)
    assert fitted.latency_s == pytest.approx(LINK.latency_s, rel=1e-6)
    assert fitted.bandwidth_Bps == pytest.approx(LINK.bandwidth_Bps, rel=1e-6)
    # Noise that would make the latency negative: clamped to 0, the bandwidth still fits.
    noisy = pm.fit_link([(b, 2, b / 5e9 * (0.9 if b == sizes[0] else 1.0)) for b in sizes])
    assert noisy.latency_s == 0.0 and noisy.bandwidth_Bps == pytest.approx(5e9, rel=1e-3)
    # Small messages slower than large ones (a busy machine): the latency alone, no bandwidth limit seen.
    flat = pm.fit_link([(4096, 2, 2e-3), (2**20, 2, 1e-3), (2**21, 2, 1.5e-3)])
    assert flat.bandwidth_Bps == float("inf") and flat.latency_s == pytest.approx(4.5e-3 / 3 / 2)
    assert pm.ring_allreduce_seconds(2**21, 2, flat) == pytest.approx(2 * flat.latency_s)
    with pytest.raises(ValueError, match="two or more sizes"):
        pm.fit_link([(4096, 2, 1e-4), (4096, 1, 1e-5)])


def test_fit_compute_and_interpolation():
    c = pm.fit_compute([(b, 1e-3 + 2e-6 * b) for b in (34, 51, 102, 510)])
    assert c.fixed_s == pytest.approx(1e-3) and c.per_sample_s == pytest.approx(2e-6)
    assert pm.fit_compute([(100, 0.01)]) == pm.Compute(0.0, 1e-4)
    sweep = [(1e3, 1e-4), (1e5, 1e-2)]
    assert pm.interpolate_seconds(sweep, 1e4) == pytest.approx(1e-3)  # log-log: halfway
    assert pm.interpolate_seconds(sweep, 1e6) == pytest.approx(1e-1)  # extrapolated


def test_core_sharing_rule():
    assert pm.sharing(1, 1, 2) == 1.0
    assert pm.sharing(2, 1, 2) == 1.0
    assert pm.sharing(3, 1, 2) == 1.5
    assert pm.sharing(4, 2, 2) == 4.0
    m = pm.Machine(pm.Compute(0.0, 1e-5), LINK, gradient_bytes=2e6, cores=2)
    # Strong scaling, 3 ranks on 2 cores: a third of the batch each, 1.5x slower per sample.
    p3 = pm.predict(m, 3, 600)
    assert p3.compute_s == pytest.approx(200 * 1e-5 * 1.5)
    # Beyond the machine: one rank per device, no sharing.
    p3_cluster = pm.predict(pm.Machine(m.compute, LINK, 2e6, cores=None), 3, 600)
    assert p3_cluster.compute_s == pytest.approx(200 * 1e-5)


def test_strong_scaling_stops_at_one_sample_per_rank_and_weak_scaling_keeps_per_rank_work():
    m = pm.Machine(pm.Compute(1e-4, 1e-5), LINK, gradient_bytes=2e6)
    strong = pm.strong_scaling(m, 510, pm.powers_of_two(1024))
    assert [p.world_size for p in strong][-1] == 256 and all(p.rank_batch >= 1 for p in strong)
    assert pm.strong_scaling(m, 510, pm.powers_of_two(510))[-1].rank_batch == 1
    with pytest.raises(ValueError, match="less than one sample"):
        pm.predict(m, 1024, 510)
    assert strong[0].efficiency == pytest.approx(1.0)
    weak = pm.weak_scaling(m, 64, pm.powers_of_two(1024))
    assert [p.world_size for p in weak][-1] == 1024 and all(p.rank_batch == 64 for p in weak)
    # Weak: compute is constant, so efficiency is step(1) / step(N), falling as the ring grows.
    assert weak[-1].efficiency == pytest.approx(weak[0].step_s / weak[-1].step_s)
    assert all(a.efficiency > b.efficiency for a, b in zip(weak[1:], weak[2:]))
    assert pm.powers_of_two(510)[-2:] == [256, 510]


def test_control_allreduces_add_their_latency():
    m = pm.Machine(pm.Compute(0.0, 0.0), LINK, gradient_bytes=2e6)
    busy = pm.Machine(pm.Compute(0.0, 0.0), LINK, gradient_bytes=2e6, control=1.5)
    added = pm.predict_step(busy, 3, 10)[1] - pm.predict_step(m, 3, 10)[1]
    assert added == pytest.approx(1.5 * pm.ring_allreduce_seconds(pm.CONTROL_BYTES, 3, LINK))
    assert pm.predict_step(busy, 1, 10)[1] == 0.0  # one rank: no communication at all


def test_step_messages_follow_strategy_and_hook():
    grad = 523_326 * 4
    assert pm.step_messages(grad) == [(grad, 1.0)]
    assert pm.step_messages(grad, comm_hook="bf16", control=1.0) == [(grad / 2, 1.0), (pm.CONTROL_BYTES, 1.0)]
    assert pm.step_messages(grad, strategy="zero1") == [(grad, 1.0), (grad, 0.5)]  # + the parameters' all-gather
    assert pm.step_messages(grad, strategy="fsdp", comm_hook="none") == [(grad, 1.5)]
    # FSDP2 per layer: each sharded layer's two all-gathers and reduce-scatter pay their own ring latency.
    layers = [784 * 500 * 4.0 + 2000, 500 * 256 * 4.0 + 1024, 256 * 10 * 4.0 + 40]
    assert pm.step_messages(sum(layers), strategy="fsdp", unit_bytes=layers) == [(b, 1.5) for b in layers]
    link = pm.Link(latency_s=1e-3, bandwidth_Bps=1e9)
    per_layer = sum(
        c * pm.ring_allreduce_seconds(b, 2, link)
        for b, c in pm.step_messages(sum(layers), strategy="fsdp", unit_bytes=layers)
    )
    one_unit = 1.5 * pm.ring_allreduce_seconds(sum(layers), 2, link)
    assert per_layer - one_unit == pytest.approx(1.5 * 2 * (len(layers) - 1) * 1e-3)
    # PowerSGD rank 4 on the MLP: each weight rows x cols goes as P (rows x 4) and Q (cols x 4), the biases
    # uncompressed; a matrix that rank 4 does not shrink 2x (10 x 12) goes uncompressed too.
    plain, p, q = pm.lowrank_elements([(500, 784), (500,), (256, 500), (256,), (10, 256), (10,)], rank=4)
    assert (p, q) == (4 * (500 + 256 + 10), 4 * (784 + 500 + 256)) and plain == 500 + 256 + 10
    assert pm.lowrank_elements([(10, 12)], rank=4) == (120, 0, 0)
    messages = pm.step_messages(grad, comm_hook="powersgd", lowrank_bytes=(4 * plain, 4 * p, 4 * q))
    assert messages == [(4 * plain, 1.0), (4 * p, 1.0), (4 * q, 1.0)]
    # Bandwidth: ~50x fewer bytes than the gradient; latency: three messages instead of one.
    wire = pm.Link(0.0, 5e9)
    compressed = pm.predict_step(pm.Machine(pm.Compute(0, 0), wire, grad, messages=tuple(messages)), 2, 1)[1]
    assert compressed < pm.predict_step(pm.Machine(pm.Compute(0, 0), wire, grad), 2, 1)[1] / 10
    slow_hops = pm.Link(1e-3, math.inf)
    assert pm.predict_step(pm.Machine(pm.Compute(0, 0), slow_hops, grad, messages=tuple(messages)), 2, 1)[
        1
    ] == pytest.approx(3 * 2e-3)


def test_overlap_is_clamped_and_the_rest_is_other():
    assert pm.overlap(1.0, 0.5, 1.2) == pytest.approx((0.3, 0.0))
    assert pm.overlap(1.0, 0.5, 0.9) == pytest.approx((0.5, 0.0))  # at most all of the communication
    assert pm.overlap(1.0, 0.5, 2.0) == pytest.approx((0.0, 0.5))  # a slower step: unexplained time
    assert pm.relative_error(1.1, 1.0) == pytest.approx(0.1)


def test_flops_per_sample_of_the_mlp_is_the_analytic_count():
    """Forward 2 x weights, backward 4 x weights per sample (6N), less the first layer's input gradient
    (2 x 784 x 500), which autograd never computes: the images need no gradient."""
    from ddp_mnist.model import build_model
    from ddp_mnist.training.profiling import flops_per_sample

    weights = 784 * 500 + 500 * 256 + 256 * 10
    counted = flops_per_sample(build_model("mlp"))
    assert counted == 6 * weights - 2 * 784 * 500
    assert counted == pytest.approx(6 * weights, rel=0.26)  # 6N overstates it by the unneeded input gradient


def test_mfu_uses_the_given_or_known_peak():
    import torch

    from ddp_mnist.training.profiling import hardware_efficiency, peak_tflops

    cpu = torch.device("cpu")
    assert peak_tflops(cpu) is None
    eff = hardware_efficiency("mlp", 1e6, 2, cpu, explicit_peak=1.0)
    assert eff["achieved_tflops"] == pytest.approx(eff["flops_per_sample"] * 1e6 / 1e12)
    assert eff["mfu"] == pytest.approx(eff["achieved_tflops"] / 2 / 1.0)
    assert hardware_efficiency("mlp", None, 1, cpu)["mfu"] is None
    assert hardware_efficiency("cnn", None, 1, cpu)["flops_per_sample"] > 10 * eff["flops_per_sample"]


def test_the_loops_overhead_is_paid_once_per_step_at_every_world_size():
    link = pm.Link(latency_s=1e-4, bandwidth_Bps=1e9)
    bare = pm.Machine(pm.Compute(1e-3, 1e-5), link, gradient_bytes=2e6, cores=None)
    loaded = dataclasses.replace(bare, overhead_s=2e-3)
    for n in (1, 2, 64):
        (c0, m0), (c1, m1) = pm.predict_step(bare, n, 100), pm.predict_step(loaded, n, 100)
        assert c1 - c0 == pytest.approx(2e-3) and m1 == m0
