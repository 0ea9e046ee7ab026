"""lowra.export: ExecuTorch (:mod:`.executorch`) and ONNX (:mod:`.onnx`) model folders built from sdk models.

Each folder's bytes are defined in ``lowra.device_runtime.formats`` (``onnx_manifest``, ``executorch_manifest``),
which the exporters import and the engines read; the exporters never import an engine. User adapter blobs are
written by ``lowra.sdk`` through the wire format of ``lowra.device_runtime.formats.adapter``; adapter folders in
PEFT's layout come from ``lowra.sdk.adapters.peft_io.save_adapter``.
"""
