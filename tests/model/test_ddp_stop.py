"""The stop flag between DDP processes (issue #21): when only rank 0 decides to stop (early
stop, time budget), every rank stops after the same epoch, on gloo (two CPU processes) and on
NCCL (a one-process group on the GPU).

Imports torch and `visionflow.model` only (no pydantic, MLflow, DVC or Prefect): the GPU
machine runs this file with `--noconftest` (bench/gpu_bench.py, step 5).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from visionflow.model import engine
from visionflow.model.augment_ops import Policy
from visionflow.model.classifier import Classifier
from visionflow.model.fit import FitRun, Recipe
from visionflow.model.zoo import FastNet

# params.yaml's train section (= TrainConfig's defaults; no pydantic on the GPU machine)
TRAIN = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "params.yaml").read_text())["train"]

EPOCHS = 4
STOP_AFTER = 1  # rank 0 alone asks to stop after this epoch
COLLECTIVE_TIMEOUT_S = 20  # a rank left waiting in an all-reduce fails after this
JOIN_TIMEOUT_S = 120  # process start-up (torch import) included


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP rank: a tiny `fast` net for EPOCHS epochs; the callback says stop on rank 0
    only. Writes what the run did to out_dir/rank<N>.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (128,), generator=g)
    x = torch.randint(0, 256, (128, 3, 16, 16), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    model = Classifier(FastNet(2, 3, widths=(4, 8, 8)), [0.5] * 3, [0.25] * 3)
    recipe = Recipe.from_params(
        TRAIN, epochs=EPOCHS, batch_size=16, lr=0.1, channels_last=False, amp=False,
        label_smoothing=0.0, schedule="cosine", warmup_epochs=0.0)
    run = FitRun(model, x, y, recipe, Policy(), num_classes=2, device="cpu",
                 dist=engine.Dist(rank, world, rank))
    asked: list[int] = []

    def rank0_decides(e) -> bool:
        wants = rank == 0 and e.epoch == STOP_AFTER
        if wants:
            asked.append(e.epoch)
        return wants

    result = run.run([rank0_decides])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"epochs_run": result.epochs_run, "steps": result.steps, "asked": asked}))
    dist.barrier()  # neither rank leaves while the other still trains
    dist.destroy_process_group()


def test_only_rank0_asks_to_stop_and_both_gloo_ranks_stop_together(tmp_path):
    """Break `engine.broadcast_flag` out of `FitRun.run` and rank 1 trains on into epoch 2
    alone: its all-reduce waits on a rank that left; it fails (or is killed here after the
    timeout) instead of stopping with rank 0."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), str(tmp_path)),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert not hung, f"rank(s) {hung} still running after {JOIN_TIMEOUT_S} s: a hang"
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed (left alone in a collective?)"
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["asked"] == [STOP_AFTER] and out[1]["asked"] == []
    steps_per_epoch = 128 // (16 * 2)
    assert [o["epochs_run"] for o in out] == [STOP_AFTER, STOP_AFTER]  # not EPOCHS
    assert [o["steps"] for o in out] == [STOP_AFTER * steps_per_epoch] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                    reason="needs CUDA and NCCL")
def test_a_one_process_nccl_group_broadcasts_the_stop_flag(tmp_path):
    """The NCCL path: a real process group on the GPU; the flag travels as a CUDA tensor
    (NCCL moves no CPU tensors), from a CUDA or a CPU training device alike."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=60))
    try:
        assert dist.get_backend() == "nccl"
        assert engine.collective_device("nccl", torch.device("cpu")) == device
        for flag in (True, False, True):
            assert engine.broadcast_flag(flag, device) is flag
            assert engine.broadcast_flag(flag, torch.device("cpu")) is flag
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
