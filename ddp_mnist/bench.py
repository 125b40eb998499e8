def add_bench_arguments(p):
    p.set_defaults(func=lambda a: 1)
