"""The blocks together (#19): the generated set -> scan -> joint augmentation -> U-Net ->
mIoU on the val pairs at their own sizes. Small and fast: 160 images of 32..40 px, a
width-8 U-Net, 20 epochs at 32 px (about 10 s on one thread). Measured: val mIoU 0.92; the
test asks 0.70 (all-background scores about 0.19). With the image flipped but not its mask
the same run ends far below."""

from __future__ import annotations

import pytest
import torch

from visionflow.data.segmentation_layout import load_pair, scan_segmentation
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.mlops.paired_iou import paired_iou_test
from visionflow.model.segmentation import SegArch, build_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import evaluate_segmenter, fit_segmenter, resize_pair

MIN_MIOU = 0.70


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, loaded CPU: one thread is several times faster
    yield
    torch.set_num_threads(before)


def _tensors(root, pair):
    image, mask = load_pair(root, pair)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()


def test_unet_learns_the_generated_set(tmp_path, one_thread):
    root = materialize_shapes(tmp_path / "shapes", n_images=160, seed=0, min_side=32,
                              max_side=40)
    scan = scan_segmentation(root, val_fraction=0.1, test_fraction=0.1, seed=0)
    train = [p for p in scan.pairs if p.split == "train"]
    val = [p for p in scan.pairs if p.split != "train"]
    images, masks = zip(*(resize_pair(*_tensors(root, p), (32, 32)) for p in train),
                        strict=True)
    torch.manual_seed(0)
    k = len(scan.classes)
    model = build_segmenter(SegArch("unet", k, kwargs={"width": 8, "depth": 3}))
    policy = JointPolicy(out_size=(32, 32), scale=(0.4, 1.4), hflip=0.5, vflip=0.5,
                         brightness=0.2, contrast=0.2, saturation=0.2)
    before, _ = evaluate_segmenter(model, (_tensors(root, p) for p in val), k)
    run = fit_segmenter(model, torch.stack(images), torch.stack(masks), policy, epochs=20,
                        batch_size=16, lr=0.01, seed=0)
    scores, per_image = evaluate_segmenter(model, (_tensors(root, p) for p in val), k)
    assert scores.miou >= MIN_MIOU, (scores.as_dict(scan.classes), run)
    assert scores.pixel_accuracy > 0.9
    # trained beats untrained image by image (the gate's paired test on the same images)
    _, untrained = evaluate_segmenter(build_segmenter(SegArch("unet", k, kwargs={
        "width": 8, "depth": 3})), (_tensors(root, p) for p in val), k)
    paired = paired_iou_test(torch.tensor(per_image).numpy(), torch.tensor(untrained).numpy())
    assert paired.p_value < 0.01 and paired.mean_delta > 0.3
    assert before.miou < 0.4
