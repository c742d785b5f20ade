"""Models: the zoo, save/load, inference, metrics, the training engine, augmentation ops."""
