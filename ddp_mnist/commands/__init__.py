"""The `ddp-mnist` command and its subcommands: argument parsing and dispatch, above the library (nothing
below imports from here)."""
