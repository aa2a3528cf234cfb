"""ftexp's Hydra plugins: the resumable Optuna sweeper (``hydra/sweeper=ftexp``) and the
config source that serves ``sweeps/`` as the ``sweep`` group (``+sweep=<name>``)."""
