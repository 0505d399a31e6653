"""From the command line to a task: Hydra's config store (``configs``), the command-line checks made before
Hydra composes anything (``preflight``) and running the chosen task with its error handling (``run``)."""
