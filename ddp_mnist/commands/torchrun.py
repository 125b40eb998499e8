"""`python -m ddp_mnist.commands.torchrun ARGS`: torchrun (`torch.distributed.run`) as the launcher scripts run it,
ending on a stop signal with one line instead of a traceback.

When SLURM preempts or requeues a job (`scontrol requeue`, the time limit) it sends SIGTERM to every process
of the step: the ranks checkpoint and stop (exit 75), and torchrun's agent shuts them down and raises
SignalException, whose traceback used to end every preempted job's log. Here the agent ends with one line and
128 + the signal's number, the shell's convention for a process ended by a signal. Anything else is torchrun's
own behaviour, unchanged.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stopped:
        name = signal.Signals(stopped.sigval).name
        print(f"ddp-mnist: torchrun got {name} and stopped its workers", file=sys.stderr)
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
