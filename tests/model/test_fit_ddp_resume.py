"""A DDP run resumed from a checkpoint ends with the weights of the run never stopped: the
checkpoint holds each rank's own generators (augmentation is drawn per rank), and every rank
takes its own back from the one file rank 0 wrote. Two gloo processes run `FitRun` directly
(no stage, no torchrun): a few seconds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from visionflow.core.config import TrainConfig
from visionflow.model.augment_ops import Policy
from visionflow.model.classifier import Classifier
from visionflow.model.engine import Dist
from visionflow.model.fit import EpochEnd, FitRun, Recipe
from visionflow.model.zoo import FastNet

WORLD = 2
POLICY = Policy(hflip=0.5, translate=2, cutout=4, cutout_p=0.5)


def _run(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tdist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                             world_size=WORLD)
    dist = Dist(rank, WORLD, rank)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 2, (128,), generator=g)
    recipe = Recipe.from_params(TrainConfig(), epochs=3, batch_size=16, lr=0.2,
                                label_smoothing=0.0, warmup_epochs=0.5, channels_last=False,
                                schedule="cosine")

    def new_run() -> FitRun:
        torch.manual_seed(0)
        model = Classifier(FastNet(2, 3, widths=(8, 16, 16)), [0.3] * 3, [0.25] * 3)
        return FitRun(model, x, y, recipe, POLICY, num_classes=2, device="cpu", seed=3,
                      dist=dist)

    full = new_run().run().model.state_dict()
    ckpt = Path(folder, "checkpoint.pt")

    def stop_after_epoch_1(e: EpochEnd) -> bool:
        state = e.run.state_dict()  # every rank: under DDP it gathers the ranks' parts
        if dist.main:
            torch.save(state, ckpt)
        return True

    new_run().run([stop_after_epoch_1])
    tdist.barrier()
    resumed = new_run()
    resumed.load_state_dict(torch.load(ckpt, weights_only=True))  # rank 0's file, every rank
    weights = resumed.run().model.state_dict()
    torch.save({"full": full, "resumed": weights}, Path(folder, f"rank{rank}.pt"))
    tdist.destroy_process_group()


def test_ddp_resume_gives_each_rank_its_own_generators_back(tmp_path):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_run, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, a in out["full"].items():
            torch.testing.assert_close(out["resumed"][k], a, rtol=0, atol=0,
                                       msg=f"rank {rank}: {k}")
