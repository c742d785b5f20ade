"""Model compression for visionflow classifiers (N x C x H x W float in [0, 1] -> logits).

Import from the submodules (each is small and loads its heavy dependencies itself):

- `measure`: file size, parameters, MACs (torch-pruning counter), CPU latency (eager / ORT);
- `onnx_export`: `export_onnx` (torch.export / dynamo, dynamic batch), `OrtClassifier`;
- `quantize`: `quantize_int8_onnx` (ONNX Runtime static QDQ int8, per-channel, calibrated);
- `prune`: `magnitude_prune` (unstructured), `structured_prune` (torch-pruning channels),
  `save_pruned` / `load_pruned`;
- `distill`: `distill` (soft targets + hard labels), `finetune`, `accuracy`;
- `lowrank`: `svd_linear`, `tucker2_conv`, `factorize_model`, `reconstruction_error`;
- `structure`: saving / rebuilding models whose layer shapes changed (used by `prune`).
"""

__all__ = ["distill", "lowrank", "measure", "onnx_export", "prune", "quantize", "structure"]
