"""Where every stage reads and writes, relative to the project root.

`dvc.yaml` declares the same paths; `tests/test_dvc_yaml.py` keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None = None) -> Layout:
        return cls(Path(root or ".").resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def cache_root(self) -> Path:
        return self.root / ".cache"

    @property
    def extract_cache(self) -> Path:
        return self.cache_root / "extracted"

    # validate
    @property
    def validate_dir(self) -> Path:
        return self.outputs / "validate"

    @property
    def manifest(self) -> Path:
        return self.validate_dir / "manifest.csv"

    @property
    def validation(self) -> Path:
        return self.validate_dir / "validation.json"

    @property
    def quarantine(self) -> Path:
        return self.validate_dir / "quarantine.csv"

    @property
    def data_docs(self) -> Path:
        return self.validate_dir / "data_docs"

    # augment
    @property
    def augment_dir(self) -> Path:
        return self.outputs / "augment"

    @property
    def cache(self) -> Path:
        return self.augment_dir / "cache.pt"

    @property
    def policy(self) -> Path:
        return self.augment_dir / "policy.json"

    # train
    @property
    def train_dir(self) -> Path:
        return self.outputs / "train"

    @property
    def model(self) -> Path:
        return self.train_dir / "model.pt"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint.pt"

    @property
    def history(self) -> Path:
        return self.train_dir / "history.csv"

    @property
    def run_info(self) -> Path:
        return self.train_dir / "run.json"

    # evaluate
    @property
    def evaluate_dir(self) -> Path:
        return self.outputs / "evaluate"

    @property
    def metrics(self) -> Path:
        return self.evaluate_dir / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.evaluate_dir / "predictions.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.evaluate_dir / "confusion.csv"

    @property
    def confusion_png(self) -> Path:
        return self.evaluate_dir / "confusion.png"

    # compress
    @property
    def compress_dir(self) -> Path:
        return self.outputs / "compress"

    @property
    def compress_models(self) -> Path:
        return self.compress_dir / "models"

    @property
    def compress_report(self) -> Path:
        return self.compress_dir / "compress.json"

    # register
    @property
    def register_dir(self) -> Path:
        return self.outputs / "register"

    @property
    def registration(self) -> Path:
        return self.register_dir / "registration.json"
