"""ddp-mnist against the plain DDP script (benchmarks/plain_ddp.py), side by side in one run.

    python benchmarks/vs_plain_ddp.py [--rounds 3] [--world-sizes 1 2] [--max-steps N] [--out FILE.md]
                                      [-- extra ddp-mnist train flags]

Both train the tutorial recipe (SGD lr 0.01, global batch 100, one epoch) under torchrun at each world size;
the rounds are interleaved (plain, ddp-mnist, plain, ...) so load from other jobs hits both alike. Timed:
the training loop (ddp-mnist: results.json's samples/s over train_seconds; the script: its own loop clock) and
the whole command (wall clock of the torchrun process, start-up and ddp-mnist's evaluation included).
Ratios are the median of the per-round pair ratios; the other columns are medians over the rounds. MNIST is
taken from --data-dir (default $DDP_MNIST_DATA). Prints a markdown table naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The CPU's model name (lscpu), its logical cores, and torch's version."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    import torch

    return f"{name}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def plain(world: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    cmd = [*torchrun(world), str(ROOT / "benchmarks" / "plain_ddp.py"), "--data-dir", args.data_dir]
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    wall, out = run(cmd, env)
    line = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    return {"samples_per_second": line["samples_per_second"], "loop_s": line["loop_seconds"], "wall_s": wall}


def ours(world: int, args: argparse.Namespace, env: dict[str, str], extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [*torchrun(world), "-m", "ddp_mnist", "train", "--recipe", "tutorial", "--epochs", "1"]
        cmd += ["--data-dir", args.data_dir, "--run-dir", str(run_dir), "--no-progress", *extra]
        cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
        wall, _ = run(cmd, env)
        results = json.loads((run_dir / "results.json").read_text())
    return {"samples_per_second": results["samples_per_second"], "loop_s": results["train_seconds"], "wall_s": wall}


def table(rows: dict[int, dict[str, list[dict[str, float]]]], rounds: int, title: str) -> str:
    lines = [
        title,
        "",
        "| world size | plain DDP samples/s | ddp-mnist samples/s | ratio (pair median) "
        "| plain DDP wall s | ddp-mnist wall s | wall ratio (pair median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, runs in rows.items():
        p, o = runs["plain"], runs["ours"]
        speed = statistics.median(b["samples_per_second"] / a["samples_per_second"] for a, b in zip(p, o))
        walls = statistics.median(b["wall_s"] / a["wall_s"] for a, b in zip(p, o))

        def med(side: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in side)

        lines.append(
            f"| {world} | {med(p, 'samples_per_second'):,.0f} | {med(o, 'samples_per_second'):,.0f} | {speed:.2f}x "
            f"| {med(p, 'wall_s'):.2f} | {med(o, 'wall_s'):.2f} | {walls:.2f} |"
        )
    lines += ["", f"{rounds} interleaved round(s); wall ratio < 1: ddp-mnist's whole command is shorter."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-steps", type=int, default=None, help="a smoke run: this many steps each")
    parser.add_argument("--data-dir", default=os.environ.get("DDP_MNIST_DATA", "data"))
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("extra", nargs="*", help="after --: more `ddp-mnist train` flags")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "disabled")
    rows: dict[int, dict[str, list[dict[str, float]]]] = {w: {"plain": [], "ours": []} for w in args.world_sizes}
    for r in range(args.rounds):
        for world in args.world_sizes:
            rows[world]["plain"].append(plain(world, args, env))
            rows[world]["ours"].append(ours(world, args, env, args.extra))
            print(
                f"round {r + 1} ws {world}: plain {rows[world]['plain'][-1]} ours {rows[world]['ours'][-1]}",
                file=sys.stderr,
                flush=True,
            )
    length = f"{args.max_steps} steps" if args.max_steps else "1 epoch"
    title = f"ddp-mnist vs a plain DDP script, tutorial recipe, {length} ({time.strftime('%Y-%m-%d')}; {machine()})"
    text = table(rows, args.rounds, title)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
