"""Segmentation on several processes: `train.procs_per_node: 2` runs the train stage through
torchrun, two gloo ranks each training a DDP replica on its own half of every epoch; rank 0
alone evaluates, logs to MLflow and writes the outputs, and the replicas end with the same
weights; killed inside an epoch (shards), the two ranks go on from their own loader positions
to the weights of the run never killed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import BIN, kill_when, make_project
from seg_projects import SEG, checkpoint_position, shapes

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.data.segmentation_feed import segmentation_pack
from visionflow.model.engine import Dist
from visionflow.model.segmentation import load_segmenter
from visionflow.model.segmentation_fit import epoch_indices
from visionflow.orchestration.stage_runner import run_stage

BATCH = 8


def test_each_rank_takes_its_own_batches_of_the_epoch():
    n = 45
    one = torch.cat(list(epoch_indices(n, BATCH, 0, 3, Dist())))
    assert sorted(one.tolist()) == list(range(n))  # one process: every pair, last batch short
    ranks = [list(epoch_indices(n, BATCH, 0, 3, Dist(r, 2, r))) for r in (0, 1)]
    assert [len(b) for b in ranks] == [2, 2] and all(len(x) == BATCH for b in ranks for x in b)
    taken = torch.cat([x for b in ranks for x in b]).tolist()
    assert len(set(taken)) == 2 * 2 * BATCH  # disjoint: 32 of the 45, whole rounds only
    assert torch.equal(ranks[0][1], one[2 * BATCH:3 * BATCH])  # rank 0: batches 0, 2, ...
    again = torch.cat(list(epoch_indices(n, BATCH, 0, 4, Dist())))
    assert not torch.equal(one, again)  # a new order each epoch


# shards: smaller batches, so that each rank has several steps an epoch, each checkpointed
HOW = {"tensor": {"segmentation.epochs": 2, "segmentation.batch_size": BATCH},
       "shards": {"segmentation.epochs": 3, "segmentation.batch_size": 4,
                  "train.checkpoint_steps": 1}}


@pytest.mark.timeout(300)  # a rank waiting on a collective the other never joins
@pytest.mark.parametrize("storage", ["tensor", "shards"])
def test_two_gloo_ranks_train_one_segmenter(tmp_path: Path, capfd, storage: str):
    layout = Layout.at(make_project(tmp_path / "proj", shapes(tmp_path / "shapes", n=60), {
        **SEG, **HOW[storage], "train.procs_per_node": 2, "data.storage": storage,
        "data.shard_bytes": 2**16}))
    params = load_params(layout.params)
    run_stage("validate", params, layout)
    run_stage("pack", params, layout)
    n = len(segmentation_pack(layout)["train_paths"])
    if storage == "shards":  # a copy, packed, to kill and resume below
        killed = Layout.at(shutil.copytree(layout.root, tmp_path / "killed"))
    capfd.readouterr()
    result = run_stage("train", params, layout)
    out = capfd.readouterr().out
    epochs = params.segmentation.epochs
    assert result.epochs_run == epochs and result.val_miou is not None, out[-3000:]
    # whole batches, as many on each rank (from the shards, each rank's half in its
    # DataLoader workers' whole batches), and the same weights at the end
    steps = {r: re.search(rf"rank {r}: (\d+) batches an epoch; weights agree across 2 ranks",
                          out) for r in (0, 1)}
    assert all(steps.values()), out[-3000:]
    counts = {int(m.group(1)) for m in steps.values()}
    assert len(counts) == 1 and 0 not in counts
    if storage == "tensor":
        assert counts == {n // (2 * BATCH)}  # whole rounds of one batch a rank
    load_segmenter(layout.model)
    assert not layout.checkpoint.exists()

    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    runs = MlflowClient().search_runs([tracking.setup(layout)])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 0 alone logs
    assert runs[0].data.tags["world_size"] == "2" and runs[0].data.tags["task"] == "segmentation"
    if storage == "shards":
        _killed_mid_epoch_resumes_to_the_same_weights(killed, layout)


def _killed_mid_epoch_resumes_to_the_same_weights(killed: Layout, unbroken: Layout) -> None:
    """Both ranks stopped (SIGSTOP, then SIGKILL: no rank writes after the look) once a
    checkpoint inside epoch 2 or 3 is there; started again, each rank goes on from its own
    loader position (two, saved with the checkpoint) and the weights are those of the run
    never stopped."""
    proc = subprocess.Popen([str(BIN / "vflow"), "stage", "train", "--root", str(killed.root)],
                            cwd=killed.root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)

    def inside_epoch_2_or_3() -> bool:
        seen = checkpoint_position(killed.checkpoint)
        return seen is not None and seen[0] >= 1 and seen[1] > 0

    kill_when(proc, inside_epoch_2_or_3, "checkpoint inside epoch 2 or 3", 240, poll=0.005)
    fit = torch.load(killed.checkpoint, weights_only=True)["fit"]
    assert fit["step"] > 0 and len(fit["positions"]) == 2, {k: fit[k] for k in ("epoch", "step")}
    assert not killed.model.exists()
    run_stage("train", load_params(killed.params), killed)
    a, b = (torch.load(lay.model, weights_only=True)["state_dict"] for lay in (unbroken, killed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
