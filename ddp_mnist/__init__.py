"""ddp-mnist: distributed data-parallel training on MNIST, done right."""

__version__ = "0.1.0"
