"""MNIST: its files on disk (raw_files.py) and its batches for the ranks (batches.py)."""
