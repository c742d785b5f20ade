"""One trial: train the train stage's model with the trial's params on the train split and
score it on the val split after every epoch, so that the pruner can stop it early.

The search reads the train and val splits of the packed data and nothing else: the test
split is left for the gate that judges the final model (`data.packed.load_splits` never reads
its bytes). In shards mode (issue #18) each trial streams the train split (RandomResizedCrop +
flip, decoded in the trial's thread: `data.workers` is 0 for trials, which run in parallel
threads already) and scores on the val stream, as the train stage does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from visionflow.core.config import Params
from visionflow.core.errors import ConfigError, DataError
from visionflow.core.layout import Layout
from visionflow.data.feed import is_shards, training_feed
from visionflow.data.packed import load_packed, load_splits, source_data_hash
from visionflow.model import engine
from visionflow.model.fit import EpochEnd
from visionflow.model.inference import stream_logits
from visionflow.model.trainer import prepare_fit, top1

SPLITS = ("train", "val")  # never "test"
_BUILD = threading.Lock()  # the initial weights come from torch's global generator


@dataclass
class TrialData:
    """The train and val splits, loaded once per process and shared by its trials (shards:
    the labels only, and where each trial opens its streams)."""

    train_x: torch.Tensor | None
    train_y: torch.Tensor
    val_x: torch.Tensor | None
    val_y: torch.Tensor
    classes: list[str]
    data_hash: str
    layout: Layout | None = None  # shards mode: the project ...
    shards: dict[str, Any] | None = None  # ... and its packed data (metadata, no pixels)
    _on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def val_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.val_x is not None
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.val_x.to(device), self.val_y.to(device))
        return self._on_device[key]


def load_trial_data(params: Params, layout: Layout) -> TrialData:
    """The packed data's train and val splits; one line when the cache is missing, was
    built for other image settings, or has no val split to score on."""
    if not layout.packed.is_file():
        raise DataError(f"{layout.packed} not found: run `dvc repro pack` (or `vflow stage "
                        "validate` then `vflow stage pack`) before `vflow tune`")
    meta = load_packed(layout.packed) if _shards_cache(layout) else None
    blob = meta if meta is not None else load_splits(layout.packed, SPLITS)
    size, channels = int(blob["image_size"]), int(blob["channels"])
    if (size, channels) != (params.data.image_size, params.data.channels):
        raise DataError(f"{layout.packed} holds {size}px {channels}-channel images, params ask "
                        f"for {params.data.image_size}px {params.data.channels}-channel: run "
                        "`dvc repro pack` first")
    if len(blob["val_y"]) == 0:
        raise ConfigError(f"data.val_fraction={params.data.val_fraction}: the val split is "
                          "empty, and tuning scores trials on it (never on test): give it "
                          "images (a val/ folder or data.val_fraction > 0)")
    return TrialData(blob.get("train_x"), blob["train_y"], blob.get("val_x"), blob["val_y"],
                     list(blob["classes"]), source_data_hash(layout),
                     layout if meta is not None else None, meta)


def _shards_cache(layout: Layout) -> bool:
    blob = torch.load(layout.packed, map_location="cpu", weights_only=True, mmap=True)
    return is_shards(blob)


@dataclass
class Outcome:
    value: float | None  # val top-1 after the last epoch run
    pruned: bool
    epochs: int
    seconds: float
    history: list[dict[str, Any]]


# (epoch, metrics) -> True to stop the trial here (pruned)
EpochHook = Callable[[int, dict[str, float]], bool]


def run_trial(params: Params, data: TrialData, device: torch.device, threads: int,
              on_epoch: EpochHook) -> Outcome:
    """Train with `params` (a trial's), score val top-1 after each epoch and hand it to
    `on_epoch`, which reports to the study and says whether to prune."""
    if device.type == "cpu":
        torch.set_num_threads(threads)  # per thread under OpenMP: set in the trial's own
        engine.keep_freed_cpu_memory()
    t0 = time.perf_counter()
    if data.shards is not None:
        assert data.layout is not None
        trial = params.model_copy(update={"data": params.data.model_copy(
            update={"workers": 0})})
        feed = training_feed(trial, data.layout, data.shards, main=True)
        assert feed.val_stream is not None
        val_stream = feed.val_stream

        def score(model: torch.nn.Module) -> float:
            logits, y = stream_logits(model, val_stream.epoch())
            return float((logits.argmax(1) == y).float().mean())
        train_x, train_y, policy = feed.sample_x, feed.sample_y, feed.policy(params.augment)
    else:
        val_x, val_y = data.val_on(device)

        def score(model: torch.nn.Module) -> float:
            return top1(model, val_x, val_y)
        assert data.train_x is not None
        train_x, train_y, policy, feed = data.train_x, data.train_y, params.augment, None
    with _BUILD:
        torch.manual_seed(params.seed)
        prepared = prepare_fit(train_x, train_y, data.classes, params.train, policy,
                               device=device, seed=params.seed,
                               stream=feed.stream if feed is not None else None)
    state = {"pruned": False, "value": None}

    def callback(e: EpochEnd) -> bool:
        val = score(e.model)
        e.metrics["val_top1"] = val
        state["value"] = val
        metrics = {"val_top1": val, "train_loss": e.train_loss, "train_top1": e.train_top1,
                   "lr": e.lr, "epoch_seconds": e.seconds}
        if on_epoch(e.epoch, metrics):
            state["pruned"] = True
            return True
        return False

    result = prepared.run.run([callback])
    return Outcome(state["value"], state["pruned"], result.epochs_run,
                   time.perf_counter() - t0, result.history)
