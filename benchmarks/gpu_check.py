"""The Python half of benchmarks/gpu_check.sh: the parts that are more than one command, and the summary.

    python3 benchmarks/gpu_check.py versions OUT [--rehearse]   # versions.txt, nvidia-smi.txt
    python3 benchmarks/gpu_check.py gpu-tests OUT               # pytest tests/test_gpu.py: its report and JUnit file
    python3 benchmarks/gpu_check.py startup OUT [TRAIN ARGS]    # startup.json: `ddp-mnist train`, wall - training
    python3 benchmarks/gpu_check.py summary OUT [--seconds S] [--rehearse]   # the tables, printed and in summary.md

Run from the checkout's root (the script does); nothing here imports torch before it needs it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TIMED_OUT = (124, 137)  # `timeout`'s status after its budget (137: SIGKILL)


# ---------------------------------------------------------------------------------------------- parts
def default_data() -> str:
    """What the GPU tests read: $DDP_MNIST_DATA, else where `ddp-mnist train` takes MNIST from by default."""
    from ddp_mnist.data.raw_files import DATA_ENV, find_data_root

    return os.environ.get(DATA_ENV) or str(find_data_root(None).resolve())


def versions(out: Path, rehearse: bool) -> int:
    """versions.txt (`key: value` lines), then nvidia-smi.txt. Status 1 when torch sees no GPU (unless rehearsing)."""
    started = time.perf_counter()
    import torch

    import_seconds = time.perf_counter() - started
    import ddp_mnist

    lines = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "import torch": f"{import_seconds:.2f} s",
        "torch CUDA": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()),
        "NCCL": _nccl_version(torch),
        "ddp-mnist": f"{ddp_mnist.__version__} ({Path(ddp_mnist.__file__).parent}), commit {_git_commit()}",
    }
    for dist in ("torchvision", "accelerate", "pytest", "pytest-xdist", "wandb"):
        try:
            lines[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            lines[dist] = "not installed"
    lines["data"] = default_data()
    lines["DDP_MNIST_DATA"] = os.environ.get("DDP_MNIST_DATA", "unset")
    lines["CUDA available"] = str(torch.cuda.is_available())
    lines["GPUs"] = str(torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines[f"GPU {i}"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}"
    smi = shutil.which("nvidia-smi")
    query = ["--query-gpu=driver_version", "--format=csv,noheader"]
    lines["driver"] = _run([smi, *query]).strip().replace("\n", "; ") if smi else "n/a (no nvidia-smi)"
    text = "".join(f"{k}: {v}\n" for k, v in lines.items())
    (out / "versions.txt").write_text(text)
    print(text, end="")

    if smi is None:
        (out / "nvidia-smi.txt").write_text(f"nvidia-smi: not found on {socket.gethostname()} (no NVIDIA driver)\n")
    else:  # the table, the topology, every detail (clocks, power, ECC, MIG)
        (out / "nvidia-smi.txt").write_text("\n".join(_run([smi, *args]) for args in ([], ["topo", "-m"], ["-q"])))
    if not rehearse and not torch.cuda.is_available():
        print(
            "gpu_check: torch sees no CUDA GPU: the GPU tests will skip, the benchmark runs on the CPU", file=sys.stderr
        )
        return 1
    return 0


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return proc.stdout + proc.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)}: {e}\n"


def _nccl_version(torch: Any) -> str:
    try:
        version = torch.cuda.nccl.version()
    except Exception as e:  # noqa: BLE001 - a CPU-only build has no NCCL; say why, whatever it raised
        return f"n/a ({type(e).__name__})"
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _git_commit() -> str:
    text = _run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]) if shutil.which("git") else ""
    return text.strip() if text.strip() and "fatal" not in text else "n/a (not a git checkout)"


def gpu_tests(out: Path) -> None:
    """pytest on tests/test_gpu.py, in place of this process (the script's timeout signals reach it)."""
    os.environ["DDP_MNIST_DATA"] = default_data()  # the tests find MNIST through it (tests/conftest.py)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rA", "--durations=0", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={out / 'gpu-tests.xml'}", str(ROOT / "tests" / "test_gpu.py")]
    print(" ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


def startup(out: Path, train_args: list[str]) -> int:
    """`ddp-mnist train` as the quick start runs it (in a throw-away run folder): its wall time, the training
    time from its results.json, and the difference: start-up, data, capture, evaluation and the files."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-startup-") as tmp:
        cmd = [sys.executable, "-m", "ddp_mnist", "train", "--no-progress", "--run-dir", f"{tmp}/run", *train_args]
        print(" ".join(cmd), flush=True)
        started = time.perf_counter()
        code = subprocess.run(cmd).returncode
        wall = time.perf_counter() - started
        results_file = Path(tmp) / "run" / "results.json"
        if code != 0 or not results_file.exists():
            print(f"gpu_check: `ddp-mnist train` exited {code}", file=sys.stderr)
            return code or 1
        res = json.loads(results_file.read_text())
    report = {
        "command": "ddp-mnist train " + " ".join(["--no-progress", "--run-dir", "RUN", *train_args]),
        "wall_seconds": wall,
        "train_seconds": res["train_seconds"],
        "startup_seconds": wall - res["train_seconds"],
        "capture_seconds": res.get("capture_seconds"),
        **{key: res.get(key) for key in ("device", "captured_step", "steps", "test_accuracy", "samples_per_second")},
    }
    (out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- summary
def part_rows(out: Path, rehearse: bool) -> list[dict[str, Any]]:
    """parts.tsv (one line per part: name, exit status, seconds, budget, files), each with its status in words
    and `ok`: status 0, every file there and not empty, and on a GPU run no GPU test skipped."""
    rows = []
    for line in (out / "parts.tsv").read_text().splitlines():
        name, rc, seconds, budget, files = line.split("\t")
        code, names = int(rc), files.split()
        missing = [f for f in names if not (out / f).is_file() or (out / f).stat().st_size == 0]
        if code == 0:
            status = "ok"
        elif code in TIMED_OUT:
            status = f"TIMED OUT ({code})"
        else:
            status = f"FAILED (exit {code})"
        ok = code == 0 and not missing
        if name == "gpu-tests":
            counts = junit_counts(out / "gpu-tests.xml")
            counted = ", ".join(f"{n} {key}" for key, n in counts.items() if n)
            status += f": {counted}" if counted else ""
            if counts.get("skipped") and not rehearse:
                status, ok = status + " (skipped on a GPU run)", False
        if missing:
            status += f"; missing or empty: {', '.join(missing)}"
        rows.append(dict(part=name, status=status, seconds=int(seconds), budget=float(budget), files=names, ok=ok))
    return rows


def junit_counts(path: Path) -> dict[str, int]:
    """passed, failures, errors, skipped in a pytest JUnit file ({} when there is none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts.pop("tests") - sum(counts.values())
    return {"passed": passed, **counts}


def bench_rows(out: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in ("bench-gpu-mlp.json", "bench-gpu-cnn.json"):
        try:
            rows += json.loads((out / name).read_text())["rows"]
        except (OSError, ValueError, KeyError):
            pass
    return rows


def targets(rows: list[dict[str, Any]], start: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """The targets of docs/speed.md against the bench rows and the start-up run: (what, target, measured, met),
    met being yes, NO, `-` (no target: measured only) or n/a (not measured, and why when the bench says)."""
    out: list[tuple[str, str, str, str]] = []
    by_key = {(r["model"], r["recipe"], r["variant"]): r for r in rows}

    def row(model: str, recipe: str, variant: str) -> dict[str, Any] | None:
        found = by_key.get((model, recipe, variant))
        return found if found and found.get("samples_per_second") else None

    def why_not(model: str, recipe: str, variant: str) -> str:
        return (by_key.get((model, recipe, variant)) or {}).get("note") or "not measured"

    def add(what: str, target: str, found: dict | None, text: str, met: bool | None, why: str) -> None:
        if found is None:
            out.append((what, target, why, "n/a"))
        else:  # a note: e.g. "capture failed: ran eagerly"
            text += f" ({found['note']})" if found.get("note") else ""
            out.append((what, target, text, "-" if met is None else "yes" if met else "NO"))

    def add_time_to_target(what: str, limit: float, key: tuple[str, str, str]) -> None:
        r = row(*key)
        seconds = r["seconds_to_target"] if r else None
        text = f"{seconds:.3g} s" if seconds is not None else f"not reached in {r['epochs']:.3g} epochs" if r else ""
        add(what, f"<= {limit:g} s", r, text, seconds is not None and seconds <= limit, why_not(*key))

    key = ("mlp", "tutorial", "resident, captured")
    r = row(*key)
    seconds = r["epochs"] * r["epoch_seconds"] if r else 0.0
    text = f"{seconds:.3g} s ({r['epochs']:.3g} epochs)" if r else ""
    add("MLP, tutorial recipe as written: training time", "<= 0.4 s", r, text, seconds <= 0.4, why_not(*key))

    key = ("mlp", "fast", "resident, captured")
    add_time_to_target("MLP, fast recipe: training time to 98.0%", 0.05, key)
    r = row(*key)
    rate = r["samples_per_second"] if r else 0.0
    text = f"{rate:,.0f} samples/s"
    add("MLP, batch 512 (fast recipe): throughput", ">= 4,000,000 samples/s", r, text, rate >= 4e6, why_not(*key))

    add_time_to_target("CNN, fast recipe: training time to 99.0%", 0.5, ("cnn", "fast", "resident, captured"))

    for recipe in ("fast", "tutorial"):
        plain_key, ddp_key = ("mlp", recipe, "resident, captured"), ("mlp", recipe, "resident, captured, DDP ws=1")
        plain, ddp = row(*plain_key), row(*ddp_key)
        share = ddp["samples_per_second"] / plain["samples_per_second"] if plain and ddp else 0.0
        what = f"MLP, {recipe} recipe: samples/s of DDP ws=1 (NCCL) captured / no DDP captured"
        add(
            what,
            ">= 95%",
            ddp if plain else None,
            f"{share:.1%}",
            share >= 0.95,
            why_not(*(ddp_key if plain else plain_key)),
        )

    key = ("mlp", "tutorial", "tutorial loop (as written)")
    r = row(*key)
    text = f"{r['samples_per_second']:,.0f} samples/s, {r['epoch_seconds']:.3g} s/epoch" if r else ""
    add("the tutorial's loop as written (MLP)", "measured", r, text, None, why_not(*key))

    text = ""
    if start:
        text = f"{start['startup_seconds']:.3g} s (wall {start['wall_seconds']:.3g} s, "
        text += f"training {start['train_seconds']:.3g} s)"
    add("start-up: `ddp-mnist train` wall minus training time", "measured", start, text, None, "not measured")
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary(out: Path, seconds: int | None, rehearse: bool) -> int:
    """The parts' table and the targets' table, printed and written to summary.md. Status 1 unless every
    part passed and wrote its files."""
    parts = part_rows(out, rehearse)
    facts = dict(line.split(": ", 1) for line in _read(out / "versions.txt").splitlines() if ": " in line)
    gpus = "; ".join(v for k, v in facts.items() if k.startswith("GPU ")) or "no GPU"
    try:
        start = json.loads((out / "startup.json").read_text())
    except (OSError, ValueError):
        start = None
    kind = "REHEARSAL on the CPU (tiny sizes: the numbers mean nothing)" if rehearse else "GPU run"
    lines = [
        f"## GPU check: {kind}",
        "",
        f"{gpus}; torch {facts.get('torch', '?')}, CUDA {facts.get('torch CUDA', '?')}, driver "
        f"{facts.get('driver', '?').split(',')[0]}; output in {out}"
        + (f"; {seconds} s in all" if seconds is not None else ""),
        "",
    ]
    lines += table(
        ["part", "status", "seconds", "budget", "files"],
        [[p["part"], p["status"], str(p["seconds"]), f"{p['budget']:g}", ", ".join(p["files"])] for p in parts],
    )
    measured = [list(t) for t in targets(bench_rows(out), start)]
    lines += ["", *table(["target (docs/speed.md)", "target", "measured", "met"], measured)]
    failed = [p["part"] for p in parts if not p["ok"]]
    lines += ["", f"FAILED: {', '.join(failed)} (see PART.log)" if failed else "every part passed"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 1 if failed or not parts else 0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:  # this checkout's package, installed or not (the script sets PYTHONPATH too)
        sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("versions", "gpu-tests", "startup", "summary"):
        p = sub.add_parser(name)
        p.add_argument("out", type=Path)
        if name in ("versions", "summary"):
            p.add_argument("--rehearse", action="store_true")
        if name == "summary":
            p.add_argument("--seconds", type=int, default=None)
        if name == "startup":
            p.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "versions":
        return versions(args.out, args.rehearse)
    if args.command == "gpu-tests":
        gpu_tests(args.out)
    if args.command == "startup":
        return startup(args.out, args.train_args)
    return summary(args.out, args.seconds, args.rehearse)


if __name__ == "__main__":
    sys.exit(main())
