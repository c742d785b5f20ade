"""ResNet-18 recipes on the GPU: which one reaches 92% flip-TTA on the JPEG CIFAR-10 copy.
Each variant stops at its first epoch >= 92%; JSON per variant into OUT. Runs from the
`.gpu/` copy that `bench/gpu_bench.sh` uses (see BENCHMARKS.md):

    python3 .gpu/bench/resnet_try.py $OUT 380          # 380: seconds for all variants
    VF_SMOKE=1 .venv/bin/python .gpu/bench/resnet_try.py /tmp/out   # toy sizes on the CPU
"""
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from cifar_data import load_cifar  # noqa: E402
from cifar_fast import train_seed  # noqa: E402

from visionflow.core.presets import load_raw  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
data = load_cifar(str(HERE.parent / "cifar10-jpeg.tar.gz"))
import os  # noqa: E402

SMOKE = bool(os.environ.get("VF_SMOKE"))
dev = torch.device("cpu" if SMOKE else "cuda")
if SMOKE:
    data = {k: (v[::500][:64] if k.endswith(("_x", "_y")) else v) for k, v in data.items()}
raw = load_raw(HERE.parent / "params.yaml", "cifar10-resnet18")
print("decoded", time.perf_counter() - t0, flush=True)
VARIANTS = {
    "cos60_plain": dict(epochs=60, schedule="cosine", lookahead=False, ema_decay=None,
                        warmup_epochs=2.0),
    "lin60_preset": dict(epochs=60),
    "cos90_plain_ls2": dict(epochs=90, schedule="cosine", lookahead=False, ema_decay=None,
                            warmup_epochs=2.0, label_smoothing=0.2),
}
if SMOKE:
    VARIANTS = {k: dict(v, epochs=1, batch_size=16) for k, v in VARIANTS.items()}
small = {k: (v[::12][:4096] if k.endswith(("_x", "_y")) else v) for k, v in data.items()}
train_seed(data if SMOKE else small, raw, 999, dev, epochs=1,
           **({"batch_size": 16} if SMOKE else {}))
deadline = t0 + float(sys.argv[2]) if len(sys.argv) > 2 else None
for name, over in VARIANTS.items():
    if deadline and time.perf_counter() > deadline - 30:
        print("skip", name, flush=True)
        continue
    row = train_seed(data, raw, 0, dev, eval_every=1, tta=1, target=0.92, stop_at_target=True,
                     deadline=deadline, **over)
    best = max((r.get("test_tta1", 0.0) for r in row["per_epoch"]), default=0.0)
    row |= {"variant": name, "over": {k: v for k, v in over.items()}, "best_tta1": best}
    print(name, "epochs", row["epochs"], "to92", row.get("seconds_to_target"), "best", best,
          flush=True)
    (out / f"r18_{name}.json").write_text(json.dumps(row, default=str))
