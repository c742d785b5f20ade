"""Every path the project reads or writes, relative to the project root.

`dvc.yaml` declares the stage outputs under the same names (a test keeps the two in step);
no other module builds a project path by hand.
"""

from __future__ import annotations

import os
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

    @property
    def sources_cache(self) -> Path:
        """torchvision datasets written as ImageFolders (`sources/<name>/`)."""
        return self.cache_root / "sources"

    @property
    def torchvision_cache(self) -> Path:
        return self.cache_root / "torchvision"

    @property
    def validate_cache(self) -> Path:
        """Manifest row caches and the memoised GX suite result."""
        return self.cache_root / "validate"

    @property
    def suite_memo(self) -> Path:
        return self.validate_cache / "suite"

    def row_cache(self, key: str) -> Path:
        return self.validate_cache / f"rows-{key}.json"

    @property
    def servers_dir(self) -> Path:
        """pid, log and URL of the local Prefect and MLflow servers."""
        return self.cache_root / "servers"

    @property
    def retrain_lock(self) -> Path:
        return self.cache_root / "retrain.lock"

    # hyperparameter search (`vflow tune`): project state, not pipeline outputs
    @property
    def shard_cache(self) -> Path:
        """Shards streamed from S3 (`data.shards_url`): the local cache, one folder a split."""
        return self.cache_root / "shards"

    @property
    def tune_dir(self) -> Path:
        return self.cache_root / "tune"

    @property
    def tune_db(self) -> Path:
        """The Optuna study database (sqlite) when no other storage is configured."""
        return self.tune_dir / "study.db"

    # the team stack on one machine (`vflow stack up`)
    @property
    def stack_dir(self) -> Path:
        """PostgreSQL data, the object store's buckets, logs and state of `vflow stack`."""
        return self.cache_root / "stack"

    @property
    def stack_state(self) -> Path:
        """pid, port and command of each stack service."""
        return self.stack_dir / "stack.json"

    @property
    def stack_credentials(self) -> Path:
        """Generated passwords and keys, as `export` lines (git-ignored with `.cache/`)."""
        return self.stack_dir / "credentials.env"

    @property
    def stack_env(self) -> Path:
        """What a client needs (URLs, the lock URL, S3 keys for DVC): `source` it."""
        return self.stack_dir / "env.sh"

    @property
    def stack_pgdata(self) -> Path:
        return self.stack_dir / "postgres"

    @property
    def stack_pg_pwfile(self) -> Path:
        """The superuser's password for initdb, there only while initdb runs."""
        return self.stack_dir / ".pg-admin-password"

    @property
    def stack_buckets(self) -> Path:
        """The object store's root: one folder per bucket."""
        return self.stack_dir / "s3"

    @property
    def stack_prefect_home(self) -> Path:
        return self.stack_dir / "prefect"

    @property
    def stack_logs(self) -> Path:
        return self.stack_dir / "logs"

    def stack_log(self, service: str) -> Path:
        return self.stack_logs / f"{service}.log"

    @property
    def launch_dir(self) -> Path:
        """The resolved params file each torchrun rank loads (`orchestration/launch.py`)."""
        return self.cache_root / "launch"

    @property
    def prefect_yaml(self) -> Path:
        return self.root / "prefect.yaml"

    # MLflow's local store: the project's own, also from a stage that DVC runs in an
    # experiment's temporary copy (`dvc exp run --queue` / `--temp`), else each queued
    # experiment would register into a store deleted with the copy, beside no champion
    @property
    def mlruns(self) -> Path:
        return self.project_root / "mlruns"

    @property
    def project_root(self) -> Path:
        """The root, or the project a DVC experiment's copy under `.dvc/tmp` belongs to (DVC
        names it in `DVC_ROOT` for every stage it runs)."""
        dvc_root = os.environ.get("DVC_ROOT")
        if dvc_root and self.root.is_relative_to(Path(dvc_root).resolve() / ".dvc" / "tmp"):
            return Path(dvc_root).resolve()
        return self.root

    @property
    def mlflow_db(self) -> Path:
        return self.mlruns / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlruns / "artifacts"

    # DVC and git
    @property
    def dvc_yaml(self) -> Path:
        return self.root / "dvc.yaml"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    @property
    def dvc_dir(self) -> Path:
        return self.root / ".dvc"

    @property
    def git_dir(self) -> Path:
        return self.root / ".git"

    @property
    def gitignore(self) -> Path:
        return self.root / ".gitignore"

    def dvc_file(self, target: str | Path) -> Path:
        """The `.dvc` file that tracks `target` (relative to the root, or absolute)."""
        path = self.root / target
        return path.with_name(path.name + ".dvc")

    @property
    def flow_file(self) -> Path:
        return self.root / "flows" / "retrain.py"

    @property
    def tune_flow_file(self) -> Path:
        return self.root / "flows" / "tune.py"

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

    @property
    def data_summary(self) -> Path:
        return self.validate_dir / "data_summary.json"

    def validation_artifacts(self) -> list[tuple[Path, str]]:
        """(file or folder, MLflow artifact path) of what validate leaves for the run."""
        return [(self.validation, "data"), (self.data_summary, "data"),
                (self.quarantine, "data"), (self.data_docs, "data/data_docs")]

    # pack
    @property
    def pack_dir(self) -> Path:
        return self.outputs / "pack"

    @property
    def packed(self) -> Path:
        """The packed data; in shards mode it holds the metadata only (no pixels)."""
        return self.pack_dir / "packed.pt"

    @property
    def shards(self) -> Path:
        """`shards/<split>/`: LitData shards of encoded images (shards mode only)."""
        return self.pack_dir / "shards"

    def split_shards(self, split: str) -> Path:
        return self.shards / split

    @property
    def policy(self) -> Path:
        return self.pack_dir / "policy.json"

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

    @property
    def confusion_norm_png(self) -> Path:
        return self.evaluate_dir / "confusion_normalized.png"

    @property
    def reliability_csv(self) -> Path:
        return self.evaluate_dir / "reliability.csv"

    @property
    def reliability_png(self) -> Path:
        return self.evaluate_dir / "reliability.png"

    @property
    def per_class_csv(self) -> Path:
        return self.evaluate_dir / "per_class.csv"

    @property
    def per_class_png(self) -> Path:
        return self.evaluate_dir / "per_class.png"

    @property
    def mistakes_png(self) -> Path:
        return self.evaluate_dir / "mistakes.png"

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

    @property
    def compress_metrics(self) -> Path:
        return self.compress_dir / "metrics.json"

    @property
    def pareto_csv(self) -> Path:
        return self.compress_dir / "pareto.csv"

    @property
    def pareto_png(self) -> Path:
        return self.compress_dir / "pareto.png"

    # register
    @property
    def register_dir(self) -> Path:
        return self.outputs / "register"

    @property
    def registration(self) -> Path:
        return self.register_dir / "registration.json"

    @property
    def gate_report(self) -> Path:
        return self.register_dir / "gate_report.md"

    @property
    def model_card(self) -> Path:
        return self.register_dir / "model_card.md"
