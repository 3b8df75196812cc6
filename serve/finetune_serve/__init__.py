"""finetune_serve: a FineTuneJob export behind the KServe Python SDK (`finetune-serve --model DIR`).

The ONNX path imports neither torch nor the trainer: the `serve` image has onnxruntime and kserve only.
"""
