"""Model compression for visionflow classifiers (N x C x H x W float in [0, 1] -> logits).

Import from the submodules (each is small and loads its heavy dependencies itself):

- `measure`: file size, parameters, MACs (torch-pruning counter), CPU latency (eager, ORT,
  several variants round-robin);
- `onnx_export`: `export_onnx` (torch.export / dynamo, dynamic batch), `OrtClassifier`;
- `quantize`: `quantize_int8_onnx` (ONNX Runtime static QDQ int8, per-channel, calibrated);
- `prune`: `magnitude_prune` (unstructured), `structured_prune` (torch-pruning channels),
  `save_pruned` / `load_pruned`;
- `distill`: `distill` (soft targets + hard labels), `finetune`, `accuracy`;
- `lowrank`: `svd_linear`, `tucker2_conv`, `factorize_model`, `reconstruction_error`;
- `structure`: saving / rebuilding models whose layer shapes changed (used by `prune`);
- `pt2e`: int8 via torchao PT2E + X86InductorQuantizer, oneDNN lowering, a re-derivable
  recipe (`save_recipe` / `load_recipe`, weights_only);
- `search`: the automatic choice (objective, Pareto front, budget), Pareto CSV and plot;
- `select`: `register_compact`, the chosen variant as the registry's `compact` version;
- `compact_model` / `compact_pyfunc`: the MLflow pyfunc serving a variant's ONNX file.

The compress stage (`visionflow.stages.compress`) drives them.
"""

__all__ = [
    "compact_model",
    "distill",
    "lowrank",
    "measure",
    "onnx_export",
    "prune",
    "pt2e",
    "quantize",
    "search",
    "select",
    "structure",
]
