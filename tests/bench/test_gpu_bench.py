"""`bench/gpu_bench.sh --dry-run`: every GPU step on the CPU at toy sizes, with pydantic and
MLflow unimportable (as on the GPU machine), so the one GPU command cannot rot."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, run

CLASSES = [f"c{i}" for i in range(10)]


def _tiny_archive(path: Path, per_class: int = 13) -> Path:
    """A CIFAR-10-shaped JPEG archive: train/<class>/*.jpg and test/<class>/*.jpg, 32x32,
    plus a member that must be skipped (a path outside the split folders)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for split, n in (("train", per_class), ("test", 4)):
            for c, name in enumerate(CLASSES):
                for i in range(n):
                    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    img[..., c % 3] //= 2
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG")
                    add(f"{split}/{name}/{i:04d}.jpg", buf.getvalue())
        add("../escape.jpg", b"not an image")
    return path


@pytest.mark.slow
def test_dry_run_writes_every_step(tmp_path: Path):
    """The default steps but 6, which `test_gpu_scale_dry_run_alone_needs_no_archive` runs
    (7, not a default: `test_record_step_dry_run_puts_ours_beside_the_record_script`)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_bench import DEFAULT_STEPS

    defaults = DEFAULT_STEPS.split(",")
    assert "6" in defaults and "7" not in defaults
    steps = [s for s in defaults if s != "6"]
    archive = _tiny_archive(tmp_path / "tiny.tar.gz")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = run(["bash", str(REPO / "bench" / "gpu_bench.sh"), str(out), "--dry-run",
                "--archive", str(archive), "--seeds", "2", "--budget", "600",
                "--steps", ",".join(steps)], REPO, check=False, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(("error_", "skipped_"))], (
        names, proc.stdout[-4000:])
    assert names == ["1_fast.json", "2_throughput.json", "3_resnet18.json", "4_augment.json",
                     "5_gpu_tests.json", "8_segmentation.json", "env.json",
                     "log.txt"]
    seg = json.loads((out / "8_segmentation.json").read_text())
    assert seg["train_img_per_s"] > 0 and 0 <= seg["test"]["miou"] <= 1
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["dry_run"] and env_json["images"] == {"train": 130, "test": 40}

    fast = json.loads((out / "1_fast.json").read_text())
    assert len(fast["runs"]) == 2 and fast["summary"]["n"] == 2
    assert all(r["seconds"] > 0 and 0 <= r["tta1"] <= 1 for r in fast["runs"])
    assert fast["runs"][0]["per_epoch"][0]["test_tta1"] >= 0

    tput = json.loads((out / "2_throughput.json").read_text())
    for mode in ("eager", "compiled"):
        med = tput[mode]["median"]
        assert set(med) == {"plain-dataloader", "plain-resident", "visionflow"}
        assert all(v > 0 for v in med.values())

    resnet = json.loads((out / "3_resnet18.json").read_text())
    assert resnet["preset"] == "cifar10-resnet18" and resnet["epochs"] == 1
    assert resnet["target"] == 0.92 and "best_tta1" in resnet

    aug = json.loads((out / "4_augment.json").read_text())
    assert any("kornia" in c for t in aug["tables"].values() for c in t)

    tests = json.loads((out / "5_gpu_tests.json").read_text())
    assert tests["returncode"] == 0 and "skipped" in tests["summary"], tests["output_tail"]


def test_gpu_tests_collect_without_dvc_mlflow_prefect_pydantic():
    """The GPU machine has none of them: `pytest -m gpu` on the torch-only files must collect
    (tests/conftest.py imports dvc only when it is there)."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_bench import GPU_TEST_FILES, pytest_gpu_argv

    proc = run(pytest_gpu_argv(["--collect-only", *GPU_TEST_FILES]), REPO, check=False,
               timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_nvjpeg_decode_equals_the_cpu_decoder" in proc.stdout
    assert "test_training_steps_never_sync_the_host" in proc.stdout


def _check_scale(scale: dict) -> None:
    for name in ("a_synthetic", "b_gpu_decode", "c_dataloader", "b_input_only",
                 "b_interpolate", "b_cpu_threads"):
        assert scale[name]["img_per_s"] > 0, (name, scale[name])
    assert scale["ratios"]["b/a"] > 0 and scale["ratios"]["b/c"] > 0
    assert scale["b_cpu_decoded_images"] == 0  # every generated JPEG is baseline
    assert scale["b_matches_cpu"]["ok"], scale["b_matches_cpu"]
    assert scale["generate"]["spec"]["images"] == 48


@pytest.mark.slow
def test_gpu_scale_dry_run_alone_needs_no_archive(tmp_path: Path):
    """Step 6 alone (`--steps 6`): generated JPEGs, the three input paths, the ratios."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = run(["bash", str(REPO / "bench" / "gpu_bench.sh"), str(tmp_path / "out"),
                "--dry-run", "--steps", "6", "--archive", str(tmp_path / "absent.tar.gz"),
                "--scale-data", str(tmp_path / "scale")], REPO, check=False, env=env,
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["6_scale.json", "env.json", "log.txt"], proc.stdout[-3000:]
    _check_scale(json.loads((tmp_path / "out" / "6_scale.json").read_text()))


def test_encoded_source_reads_every_image_once_per_epoch(tmp_path: Path):
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_scale import encoded_source, generate, list_items

    info = generate(tmp_path / "jpegs", 12, 40, 30, classes=3, workers=1)
    assert info["spec"]["images"] == 12 and not info["reused"]
    assert generate(tmp_path / "jpegs", 12, 40, 30, classes=3, workers=1)["reused"]
    items = list_items(tmp_path / "jpegs")
    source = encoded_source(items, batch_size=4, seed=0)
    epoch = [next(source) for _ in range(3)]
    again = next(encoded_source(items, batch_size=4, seed=0))
    source.close()
    seen = [bytes(t.numpy()) for enc, _ in epoch for t in enc]
    files = {Path(p).read_bytes(): y for p, y in items}
    assert sorted(seen) == sorted(files) and len(set(seen)) == 12
    assert [files[b] for b in seen] == [int(y) for _, ys in epoch for y in ys]
    assert [bytes(t.numpy()) for t in again[0]] == seen[:4]  # same seed, same order


def test_gpu_batches_raise_the_input_threads_error_in_the_training_loop():
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_scale import gpu_batches

    from visionflow.core.errors import DataError
    from visionflow.model.gpu_decode import GpuBatchTransform

    def source():
        yield [torch.tensor([1, 2, 3], dtype=torch.uint8)], torch.tensor([0])

    tf = GpuBatchTransform(True, 8, 8, (0.5, 1.0), (0.75, 1.33), True, 3,
                           torch.device("cpu"), 0)
    batches = gpu_batches(source(), tf, torch.device("cpu"))
    with pytest.raises(DataError, match="image 0 of the batch"):
        next(batches)


# A stand-in for the record script (its code is never committed): the same interface the
# runner drives (`CifarNet`, `main(run, model)` printing a table whose final 'eval' row ends
# with the counted seconds, `logging_columns_list`), reading `cifar10/train.pt` and
# `cifar10/test.pt` with the keys, shapes and dtypes the record's loader expects.
RECORD_STUB = '''
import torch
from torch import nn

logging_columns_list = ["run   ", "epoch", "train_acc", "val_acc", "tta_val_acc",
                        "time_seconds"]


class CifarNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def main(run, model):
    for split in ("train", "test"):
        d = torch.load(f"cifar10/{split}.pt", weights_only=True)
        n = len(d["labels"])
        assert d["images"].shape == (n, 32, 32, 3) and d["images"].dtype == torch.uint8
        assert d["labels"].dtype == torch.int64 and len(d["classes"]) == 10
    x = d["images"].permute(0, 3, 1, 2).float() / 255
    acc = (model(x).argmax(1) == d["labels"]).float().mean().item()
    print("|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |")
    print("|          |   eval  |     0.5000  |           |       %.4f  |        %.4f  |"
          % (acc, 1.25 if run != "warmup" else 9.0))
    return acc
'''


def test_final_seconds_reads_the_records_last_row():
    sys.path.insert(0, str(REPO / "bench"))
    from airbench_run import final_seconds

    printed = ("|  run     |  epoch  |  time_seconds  |\n|         0  |      1  |  0.3  |\n"
               "|          |   eval  |        1.7321  |\n")
    assert final_seconds(printed, ["run   ", "epoch", "time_seconds"]) == 1.7321
    with pytest.raises(ValueError, match="no final 'eval' row"):
        final_seconds("|  0  |  1  |  0.3  |\n")


@pytest.mark.slow
def test_record_step_dry_run_puts_ours_beside_the_record_script(tmp_path: Path):
    """Step 7 on the CPU: the cifar10-muon preset through `fit` (compile on, eager backend),
    the archive converted for the record's loader, the runner driving a stand-in script."""
    archive = _tiny_archive(tmp_path / "tiny.tar.gz")
    stub = tmp_path / "airbench" / "airbench94_muon.py"
    stub.parent.mkdir()
    stub.write_text(RECORD_STUB)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = run(["bash", str(REPO / "bench" / "gpu_bench.sh"), str(out), "--dry-run",
                "--steps", "7", "--archive", str(archive), "--seeds", "2",
                "--record-script", str(stub), "--record-runs", "3",
                "--record-data", str(tmp_path / "airbench-data")], REPO,
               check=False, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["7_record.json", "7_record_runs.json", "env.json", "log.txt"], (
        names, proc.stdout[-3000:])
    res = json.loads((out / "7_record.json").read_text())
    assert res["ours"]["preset"] == "cifar10-muon" and len(res["ours"]["runs"]) == 2
    assert res["ours"]["warmup"]["wall_seconds"] > 0
    assert all(r["seconds"] > 0 and 0 <= r["tta1"] <= 1 for r in res["ours"]["runs"])
    rec = res["record"]
    assert rec["returncode"] == 0 and rec["images"] == {"train": 130, "test": 40}
    assert [r["seconds"] for r in rec["runs"]] == [1.25] * 3
    assert rec["warmup"]["seconds"] == 9.0  # the warm-up run is reported, not counted
    assert res["ratio_of_medians"] == pytest.approx(
        res["ours"]["summary"]["seconds_median"] / 1.25)


def test_record_step_without_the_script_is_one_line(tmp_path: Path):
    proc = run([sys.executable, str(REPO / "bench" / "airbench_run.py"), "--script",
                str(tmp_path / "absent.py"), "--data", str(tmp_path), "--out",
                str(tmp_path / "r.json")], REPO, check=False, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "record script not found" in lines[0]


RECORD_SCRIPT = REPO / ".gpu" / "airbench" / "airbench94_muon.py"  # git-ignored, when fetched


@pytest.mark.skipif(not RECORD_SCRIPT.is_file(), reason="record script not fetched into .gpu/")
def test_runner_reads_the_real_record_scripts_table():
    """Before a GPU session (README_gpu.md): the fetched script imports on the CPU, builds its
    net, and its own table printer's final row parses to the seconds it counted."""
    import contextlib

    sys.path.insert(0, str(REPO / "bench"))
    from airbench_run import final_seconds, load_script

    mod = load_script(RECORD_SCRIPT)
    assert sum(p.numel() for p in mod.CifarNet().parameters()) > 1e6
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.print_columns(mod.logging_columns_list, is_head=True)
        mod.print_training_details({"run": 0, "epoch": 1, "time_seconds": 0.25}, False)
        mod.print_training_details({"epoch": "eval", "tta_val_acc": 0.9, "time_seconds": 1.5},
                                   True)
    assert final_seconds(buf.getvalue(), mod.logging_columns_list) == 1.5
