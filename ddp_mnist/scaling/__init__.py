"""The scaling experiment: the sweep, the all-reduce benchmark, the performance model, the analysis, the
report and its plots; and the network between nodes, measured and judged for `ddp-mnist doctor`."""
