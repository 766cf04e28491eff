"""The deployable artefact: the decode step exported to ONNX, checked against PyTorch, run without torch.

- ``sokhan.export.onnx``: trace ``step`` to ONNX; the bundle's ``config.json``.
- ``sokhan.export.prefill``: the whole-prompt graph (``prefill.onnx``), both architectures.
- ``sokhan.export.parity``: PyTorch ``step`` against ONNX Runtime on real prompts (``parity.json``).
- ``sokhan.export.quantize``: float16 and int8 variants, judged by top-1 agreement with float32.
- ``sokhan.export.runtime``: ``Decoder(bundle)`` (generate, next words); numpy + onnxruntime, never torch.
- ``sokhan.export.nextword``: next-word prediction from any next-token step function (numpy only).

Importing this package imports nothing heavy.
"""
