"""Data parallelism: the launcher's environment, devices, the process group, small collectives, the
watchdog, the strategies (DDP and its hooks, ZeRO-1, FSDP2) and test-only fault injection."""
