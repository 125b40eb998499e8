"""The slow rank (training/stragglers.py): the work clock on a real model's backward, and the verdict's rules,
without processes. A real 2-rank job with one rank slowed is in test_faults.py."""

from __future__ import annotations

import time

import torch
from torch import nn

from ddp_mnist.training.stragglers import SlowRanks, WorkClock, slow_text, tracker_values


def test_work_clock_leaves_out_the_waits():
    """The time from the last gradient to the end of backward, and inside the loop's collectives, is a wait
    (for the others), not this rank's work."""
    model = nn.Linear(4, 2)
    clock = WorkClock(samples_per_step=8, model=model)
    for _ in range(3):
        model(torch.ones(8, 4)).sum().backward()
        time.sleep(0.02)  # as DDP waits for the others' all-reduce after the last gradient
        clock.backward_done()
        with clock.waiting():
            time.sleep(0.02)  # as the stop check waits
        clock.tick()
    work = clock.take()
    assert work is not None and 0 <= work < 0.02  # each step took over 40 ms, all of it but the backward waiting
    assert clock.take() is None  # nothing since the last take


def test_no_gradient_hook_no_measure():
    """A captured CUDA graph runs no Python hooks: then nothing is measured (not a wrong number)."""
    clock = WorkClock(samples_per_step=8, model=nn.Linear(4, 2))
    clock.tick()
    clock.tick()
    assert clock.take() is None


def test_a_rank_is_named_after_two_slow_epochs_in_a_row_against_the_others_median():
    slow = SlowRanks(threshold=0.2)
    verdicts = [slow.verdict_of([0.010, 0.010, 0.0125, 0.010], 5.0) for _ in range(2)]  # rank 2: +25%, twice
    assert verdicts[0] == {}  # one slow epoch may be noise
    assert verdicts[1] == {2: 0.25}
    assert slow.verdict_of([0.010, 0.010, 0.010, 0.010], 5.0) == {}  # back to normal: no longer named
    assert slow.verdict_of([0.010, 0.0115, 0.010, 0.010], 5.0) == {}  # +15%: under the threshold
    # At 2 ranks the other's value is the median: a rank 50% slower shows +50%, not the +20% of the mean's.
    two = SlowRanks(threshold=0.2)
    two.verdict_of([0.010, 0.015], 5.0)
    assert two.verdict_of([0.010, 0.015], 5.0) == {1: 0.5}
    assert SlowRanks(threshold=0.2).verdict_of([0.010, None], 5.0) == {}  # a rank that measured nothing: no verdict


def test_a_few_seconds_of_load_from_another_job_do_not_name_a_rank():
    """Two short epochs over the threshold (a CI machine's other job descheduling one rank for 2 s) are not a
    slow rank: it is named once it has been over the threshold for --slow-rank-seconds in a row."""
    slow = SlowRanks(threshold=0.2, min_seconds=30.0)
    assert [slow.verdict_of([0.010, 0.020], 1.0) for _ in range(2)] == [{}, {}]  # 2 s of it
    assert slow.verdict_of([0.010, 0.010], 1.0) == {}  # the burst is over: the count starts again
    verdicts = [slow.verdict_of([0.010, 0.015], 10.0) for _ in range(3)]
    assert verdicts == [{}, {}, {1: 0.5}]  # a slow node stays slow: named at 30 s
    assert slow.verdict_of([0.020, 0.010], 10.0) == {}  # rank 0 is slow now: its own count starts at 0


def test_the_verdict_in_the_epoch_row_the_trackers_and_a_line():
    row = {"epoch": 3, "work_ms_per_step": [35.7, 57.2], "slow_ranks": {"1": 0.6}}
    assert tracker_values(row) == {
        "epoch": 3,
        "work_ms_per_step/rank_0": 35.7,
        "work_ms_per_step/rank_1": 57.2,
        "slow_ranks": 1,
    }
    assert slow_text({"1": 0.6}) == "rank 1 (+60%)"
