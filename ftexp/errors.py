"""The error a run refuses with: a leaf every module can import without pulling in the config
schema. Its message names the key that is wrong and says what to do; the entry scripts print it
without a traceback and exit non-zero."""


class ConfigError(ValueError):
    """A config that cannot run. The message says which key and what to do."""
