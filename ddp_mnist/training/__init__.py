"""One training job: the entry point every launcher ends in (train.py), the loop (trainer.py), and what the
loop uses: state, meter, evaluation, the captured step, signals, profiling; and `ddp-mnist bench`'s timings."""
