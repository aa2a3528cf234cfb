"""``python -m ftexp.presets <overrides>``: trainable-parameter count of a preset, offline."""

from ftexp.presets import main

raise SystemExit(main())
