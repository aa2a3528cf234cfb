"""ftexp's Hydra plugin: the resumable Optuna sweeper (``hydra/sweeper=ftexp``).

The sweep configs in ``sweeps/`` reach Hydra as the ``sweep`` group (``+sweep=<name>``)
through the ``conf/sweep`` link, not through a plugin."""
