"""Train a preset on the CIFAR-10 JPEG archive with the project's `fit` loop, seed by seed.

The CPU proof of the `cifar10-fast` recipe (accuracy does not depend on the hardware) and the
GPU time-to-accuracy runs (`gpu_bench.py` imports `train_seed`). The archive is decoded once
into uint8 tensors; each seed then builds a fresh model, trains it with the preset's recipe
(test accuracy every `--eval-every` epochs, outside the timed window) and records the final
TTA 0/1/2 test accuracy. One JSON line per seed is appended to `--log` as soon as it ends.

    nice -n 19 .venv/bin/python bench/cifar_fast.py --preset cifar10-fast --seeds 0 1 2 \
        --archive ../shared/datasets/cifar10-jpeg.tar.gz --threads 2 --log /tmp/proof/fast.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent / "src").is_dir():
    sys.path.insert(0, str(HERE.parent / "src"))

from cifar_data import load_cifar  # noqa: E402

from visionflow.core.presets import load_raw  # noqa: E402
from visionflow.model import engine  # noqa: E402
from visionflow.model.augment_ops import Policy  # noqa: E402
from visionflow.model.classifier import Arch, build_classifier, channel_stats  # noqa: E402
from visionflow.model.fit import EpochEnd, FitRun, Recipe  # noqa: E402
from visionflow.model.inference import device_logits  # noqa: E402
from visionflow.model.trainer import place  # noqa: E402

PARAMS = HERE.parent / "params.yaml"


def accuracy(model, x, y, tta: int, device, amp: bool) -> float:
    logits = device_logits(model, x, 2000, device, tta, amp=amp, channels_last=True)
    return float((logits.argmax(1) == y.to(logits.device)).float().mean())


def setup(raw: dict, epochs: float | None = None, **over) -> tuple[Recipe, Policy]:
    train = dict(raw["train"], **({"epochs": epochs} if epochs else {}), **over)
    return Recipe.from_params(train), Policy.from_dict(raw["augment"])


def train_seed(data: dict, raw: dict, seed: int, device: torch.device, *, epochs=None,
               eval_every: int = 0, tta: int = 1, target: float | None = None,
               stop_at_target: bool = False, deadline: float | None = None, log=None,
               **recipe_over) -> dict:
    """One run: returns {'seed', 'train_seconds', 'tta_seconds', 'seconds', 'tta0/1/2', ...}.

    `seconds` = whitening + training + the final TTA-`tta` test evaluation (what the speed
    records count). Every `eval_every` epochs the test accuracy (TTA 0 and `tta`) is measured
    outside the timed window; with `stop_at_target` training stops at the first epoch whose
    TTA-`tta` accuracy reaches `target`. Past `deadline` (time.perf_counter) it stops too.
    """
    recipe, policy = setup(raw, epochs, **recipe_over)
    torch.manual_seed(seed)
    mean, std = channel_stats(data["train_x"])
    arch = Arch(raw["train"]["model"], len(data["classes"]), data["train_x"].shape[-1],
                data["train_x"].shape[1], mean, std, list(data["classes"]))
    model = build_classifier(arch)
    amp = recipe.amp and device.type == "cuda"
    x_test, y_test = data["test_x"].to(device), data["test_y"].to(device)
    per_epoch: list[dict] = []
    key = f"test_tta{tta}"

    def on_epoch(e: EpochEnd) -> bool:
        row = {"epoch": e.epoch, "train_loss": round(e.train_loss, 4),
               "train_top1": round(e.train_top1, 4), "train_seconds": round(e.train_seconds, 3)}
        if eval_every and e.epoch % eval_every == 0:
            row["test_top1"] = accuracy(e.model, x_test, y_test, 0, device, amp)
            if tta:
                row[key] = accuracy(e.model, x_test, y_test, tta, device, amp)
        per_epoch.append(row)
        if log:
            print(json.dumps({"seed": seed, **row}), file=log, flush=True)
        hit = target is not None and row.get(key, 0.0) >= target
        return (stop_at_target and hit) or (deadline is not None
                                            and time.perf_counter() > deadline)

    # on the device before the clock, as the train stage places them (`trainer.place`)
    train_x, train_y, _ = place(data["train_x"], data["train_y"], device)
    run = FitRun(model, train_x, train_y, recipe, policy,
                 num_classes=len(data["classes"]), device=device, seed=seed)
    result = run.run([on_epoch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    final = {f"tta{tta}": accuracy(result.model, x_test, y_test, tta, device, amp)}
    tta_seconds = time.perf_counter() - t0  # accuracy() reads the result: synced
    for level in (0, 1, 2):
        if f"tta{level}" not in final:
            final[f"tta{level}"] = accuracy(result.model, x_test, y_test, level, device, amp)
    out = {"seed": seed, "epochs": result.epochs_run, "planned_epochs": run.epochs,
           "steps": result.steps, "train_seconds": result.train_seconds,
           "tta_seconds": tta_seconds, "seconds": result.train_seconds + tta_seconds, **final,
           "per_epoch": per_epoch}
    if target is not None:  # the first epoch whose TTA accuracy reached the target
        first = next((r for r in per_epoch if r.get(key, 0.0) >= target), None)
        out["target"] = target
        out["epoch_at_target"] = first["epoch"] if first else None
        out["seconds_to_target"] = first["train_seconds"] + tta_seconds if first else None
    return out


def summary(rows: list[dict], key: str = "tta1") -> dict:
    acc = [r[key] for r in rows]
    secs = [r["seconds"] for r in rows]
    return {"n": len(rows), f"{key}_mean": statistics.mean(acc),
            f"{key}_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            f"{key}_min": min(acc), f"{key}_max": max(acc),
            "seconds_median": statistics.median(secs), "seconds_min": min(secs),
            "seconds_max": max(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True)
    ap.add_argument("--preset", default="cifar10-fast")
    ap.add_argument("--params", default=str(PARAMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=None, help="override the preset's")
    ap.add_argument("--eval-every", type=int, default=1, help="test top-1 every N epochs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None, help="images per split (dry runs)")
    ap.add_argument("--log", required=True, help="JSON lines: per epoch and per seed")
    ap.add_argument("--no-keep-heap", action="store_true",
                    help="CPU: let glibc return freed memory (the comparison in BENCHMARKS)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    raw = load_raw(a.params, a.preset)
    device = torch.device(a.device)
    if device.type == "cpu" and not a.no_keep_heap:
        engine.keep_freed_cpu_memory()  # as the train stage does
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_cifar(a.archive, limit=a.limit)
    with open(a.log, "a") as log:
        print(json.dumps({"event": "start", "preset": a.preset, "device": str(device),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "train": len(data["train_x"]), "test": len(data["test_x"]),
                          "decode_s": round(time.perf_counter() - t0, 1),
                          "train_cfg": raw["train"], "augment": raw["augment"]}),
              file=log, flush=True)
        rows = []
        for seed in a.seeds:
            row = train_seed(data, raw, seed, device, epochs=a.epochs, eval_every=a.eval_every,
                             log=log)
            rows.append(row)
            print(json.dumps({"event": "seed", **row}), file=log, flush=True)
        print(json.dumps({"event": "summary", **summary(rows)}), file=log, flush=True)


if __name__ == "__main__":
    main()
