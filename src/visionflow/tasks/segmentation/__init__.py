"""`task: segmentation`: validate, pack, train, evaluate and register for image + mask pairs
(the building blocks are `data/segmentation_*`, `model/segmentation*`, `mlops/paired_iou`).
Compress for segmentation is the compress stage's own (`stages/compress.py`)."""
