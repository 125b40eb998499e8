def add_scale_arguments(p):
    p.set_defaults(func=lambda a: 1)
