"""lowra.export: ExecuTorch and ONNX artifacts built from sdk models (see the export issues).

User adapter blobs are written by ``lowra.sdk`` through the wire format owned by ``lowra.device_runtime.format``;
adapter folders in PEFT's layout come from ``lowra.sdk.train.save_adapter``.
"""
