"""ONNX export: ``python -m lowra.export.onnx --help``."""
from lowra.export.onnx.exporter import *  # noqa: F401,F403
