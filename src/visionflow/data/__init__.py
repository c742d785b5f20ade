"""Data: sources, scans and splits, image decoding, the manifest, the tensor cache, drift,
DVC."""
