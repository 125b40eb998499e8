"""What `ddp-mnist train` spends before its first step, and how much of it is ddp-mnist's own.

    python benchmarks/startup.py [--rounds 5] [-- extra train flags]

Each round is a fresh process that imports torch, then pays torch's own first-use costs that any training
script pays (`import torch._dynamo`, which torch.optim's first optimizer triggers; one tiny matmul and
backward), then runs `ddp-mnist train --recipe tutorial --max-steps 1` (one process, MNIST from
$DDP_MNIST_DATA) and notes when its first epoch's loop starts. Printed: the medians over the rounds of
`import torch`, torch's first use, and ddp-mnist's own start-up (from main() to the loop: parsing, settings,
the run folder, the data read and checked, the model, the optimizer, the trackers). The process's own
interpreter start is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, tempfile, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torch._dynamo
x = torch.ones(8, 8, requires_grad=True)
(x @ x).sum().backward()
t2 = time.perf_counter()
from ddp_mnist.commands import cli
from ddp_mnist.training import trainer
first = {}
epoch = trainer.Trainer.train_epoch
def noted(self):
    first.setdefault("t", time.perf_counter())
    return epoch(self)
trainer.Trainer.train_epoch = noted
with tempfile.TemporaryDirectory() as tmp:
    argv = ["train", "--recipe", "tutorial", "--max-steps", "1", "--no-progress", "--run-dir", tmp + "/run"]
    cli.main(argv + json.loads(sys.argv[1]))
print(json.dumps({"import_torch_s": t1 - t0, "torch_first_use_s": t2 - t1, "ours_s": first["t"] - t2}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="after --: more `ddp-mnist train` flags")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("WANDB_MODE", "disabled")
    rows = []
    for _ in range(args.rounds):
        cmd = [sys.executable, "-c", CHILD, json.dumps(args.extra)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"start-up run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    medians = {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}
    print(json.dumps({"rounds": args.rounds, **medians}))


if __name__ == "__main__":
    main()
