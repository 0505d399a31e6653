"""A run's outcome: the one writer of ``results.json`` and ``failure.json`` (``files``), the callbacks that
measure throughput and validation history, the terminal table (``report``) and the dashboards (wandb)."""
