"""ftexp: fine-tuning experiments for large language models.

One composed Hydra config is one run; a run writes one directory of results.
Entry points live in ``train.py`` and ``evaluate.py``; the logic lives here,
one module per concern (see the README's "Where things live").
"""

__version__ = "0.1.0"
