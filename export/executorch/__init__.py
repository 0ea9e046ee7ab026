"""ExecuTorch export: ``python -m lowra.export.executorch --help``."""
from lowra.export.executorch.exporter import *  # noqa: F401,F403
