"""The sweep's plots (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddp_mnist.scaling.analysis import Explanation, scaling_mode


def _two_panels(width: float, height: float):
    """A figure with two plots side by side (throughput, efficiency). A bare Figure renders with Agg: no
    display, no global pyplot state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    return fig, left, right


def _points(rows: list[dict[str, Any]], key: str, scale: float = 1) -> tuple[list[int], list[float]]:
    """The rows that have a value for `key` (neither None nor 0): their world sizes, and the values x scale."""
    have = [r for r in rows if r.get(key)]
    return [r["world_size"] for r in have], [scale * r[key] for r in have]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Throughput (with the linear ideal) and efficiency against world size."""
    sizes = [r["world_size"] for r in rows]
    base = rows[0]
    fig, left, right = _two_panels(8, 3.2)
    if base["steady_samples_per_second"]:
        left.plot(
            sizes, [base["steady_samples_per_second"] * n / sizes[0] for n in sizes], "--", color="gray", label="linear"
        )
    left.plot(*_points(rows, "steady_samples_per_second"), "o-", label="measured")
    left.set(xlabel="world size (ranks)", ylabel="samples/s (steady state)", title="Throughput", ylim=(0, None))
    left.legend()
    right.axhline(100, ls="--", color="gray")
    sizes_measured, efficiency = _points(rows, "efficiency", 100)
    right.plot(sizes_measured, efficiency, "o-")
    right.set(
        xlabel="world size (ranks)",
        ylabel="% of linear",
        title="Parallel efficiency",
        ylim=(0, max([110] + [e + 10 for e in efficiency])),
    )
    if any(r.get("predicted_samples_per_second") for r in rows):
        # the model's prediction at each measured world size (1-rank timings + the all-reduce fit)
        left.plot(*_points(rows, "predicted_samples_per_second"), "x--", label="predicted")
        left.legend()
        right.plot(*_points(rows, "predicted_efficiency", 100), "x--", label="predicted")
    for ax in (left, right):
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{scaling_mode(rows)} scaling, {base['device']} ({base['backend']})")
    fig.savefig(path)


def plot_prediction(rows: list[dict[str, Any]], model: Explanation, path: Path) -> None:
    """Predicted throughput and efficiency against world size (log scale), weak to 1024 ranks and strong to
    the global batch, one rank per device; the measured points (this machine) beside them."""
    fig, left, right = _two_panels(9, 3.4)
    for scaling, style in (("weak", "-"), ("strong", "--")):
        curve = [p for p in model.predictions if p["scaling"] == scaling]
        label = (
            f"weak, {curve[0]['rank_batch']:g}/rank"
            if scaling == "weak"
            else f"strong, batch {curve[0]['global_batch']}"
        )
        left.plot(
            [p["world_size"] for p in curve],
            [p["samples_per_second"] for p in curve],
            style,
            label=f"predicted {label}",
        )
        right.plot(
            [p["world_size"] for p in curve], [100 * p["efficiency"] for p in curve], style, label=f"predicted {label}"
        )
    left.plot(*_points(rows, "steady_samples_per_second"), "o", label="measured (this machine)")
    right.plot(*_points(rows, "efficiency", 100), "o", label="measured")
    # the model with this machine's cores, at the world sizes measured here
    left.plot(*_points(rows, "predicted_samples_per_second"), "x", label="predicted (this machine)")
    right.plot(*_points(rows, "predicted_efficiency", 100), "x", label="predicted (this machine)")
    left.set(xscale="log", yscale="log", xlabel="world size (ranks)", ylabel="samples/s", title="Throughput")
    right.set(
        xscale="log", xlabel="world size (ranks)", ylabel="% of linear", title="Parallel efficiency", ylim=(0, 110)
    )
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    link = model.target.link
    fig.suptitle(
        f"Predicted: one rank per device, {model.link_source} link "
        f"({1e6 * link.latency_s:.1f} us, {link.bandwidth_Bps / 1e9:.2f} GB/s)"
    )
    fig.savefig(path)
