"""Model compression for visionflow classifiers (N x C x H x W float in [0, 1] -> logits).

A library: it imports the base modules and `model/`, never `data/`, `mlops/` or a stage;
files go only to the folders it is given. Import from the submodules:

- methods:
  - `quantize`: `quantize_int8_onnx` (ONNX Runtime static QDQ int8, per-channel, calibrated);
  - `prune`: `magnitude_prune` (unstructured), `structured_prune` (torch-pruning channels),
    `save_pruned` / `load_pruned`;
  - `lowrank`: `svd_linear`, `tucker2_conv`, `factorize_model`, `reconstruction_error`;
  - `distill`: `distill` (soft targets + hard labels), `finetune`, `accuracy`;
  - `pt2e`: int8 via torchao PT2E + X86InductorQuantizer, oneDNN lowering, a re-derivable
    recipe (`save_recipe` / `load_recipe`, weights_only);
- formats:
  - `onnx_export`: `export_onnx` (torch.export / dynamo, dynamic batch), `OrtClassifier`,
    `OrtModule`;
  - `structure`: saving / rebuilding models whose layer shapes changed (pruned, factorised);
- measuring: `measure` (file size, parameters, MACs, latency helpers, runners);
- the search the compress stage runs:
  - `context`: `Context`, what every builder shares (the original, data, options) and how a
    variant is scored against the original;
  - `variants`: `Variant` and one builder per method;
  - `sweep`: `build_variants`, which variants in which order, failures recorded as skipped;
  - `latency`: round-robin CPU / GPU latency of built variants, `environment`;
  - `pareto`: the automatic choice (objective, Pareto front, budget), Pareto CSV and plot.

The compress stage (`visionflow.stages.compress`) drives them; registering the chosen
variant is `visionflow.mlops.compact`.
"""

__all__ = [
    "context",
    "distill",
    "latency",
    "lowrank",
    "measure",
    "onnx_export",
    "pareto",
    "prune",
    "pt2e",
    "quantize",
    "structure",
    "sweep",
    "variants",
]
