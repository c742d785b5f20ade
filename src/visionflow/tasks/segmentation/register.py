"""Register for `task: segmentation`: log the segmenter, register a version tagged
`task=segmentation`, and gate the champion alias on mIoU with the paired per-image IoU test
(`mlops.segmentation_gate`), under the registry lock, as classification's register does.

Both models are scored by the same code on the same test pairs: those neither of them
trained or validated on (by the pair's sha256). A champion of another task is a one-line
error naming its version and task. Writes `registration.json`, `gate_report.md` and
`model_card.md`; the card is the version's description and shows mIoU.

The compact copy: compress's choice for a segmenter (an ONNX variant within
`compress.max_miou_drop`) is registered by `mlops.compact.register_compact` once this version
is the champion, as for classifiers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import mlflow
from torch import Tensor

from visionflow.core.config import Params
from visionflow.core.files import read_json, write_json
from visionflow.core.layout import Layout
from visionflow.data.packed import split_hashes
from visionflow.data.segmentation_feed import segmentation_pack, segmentation_pairs
from visionflow.mlops import gate, registry, tracking
from visionflow.mlops.card import set_card
from visionflow.mlops.compact import register_compact
from visionflow.mlops.gate import scored_set
from visionflow.mlops.lineage import trained_hashes
from visionflow.mlops.provenance import LINEAGE, version_tags
from visionflow.mlops.publish import (
    describe_registered_model,
    log_model_metrics,
    log_train_hashes,
    record_decision,
)
from visionflow.mlops.segmentation_card import (
    headline,
    log_segmenter,
    score,
    segmentation_card,
    version_scores,
)
from visionflow.mlops.segmentation_gate import check_task, decide_iou
from visionflow.model.inference import pick_device
from visionflow.model.segmentation import load_segmenter
from visionflow.model.segmentation_metrics import commonest_class_miou

TASK = "segmentation"


def run(params: Params, layout: Layout) -> dict[str, Any]:
    cfg = params.register_
    validation = read_json(layout.validation) or {}
    cache = segmentation_pack(layout)

    def test_pairs() -> Iterator[tuple[Tensor, Tensor]]:
        return segmentation_pairs(params, layout, "test", pack=cache)
    tags = {**version_tags(params, layout), "model": params.segmentation.model, "task": TASK}
    trained = {s: split_hashes(cache, s) for s in ("train", "val", "test")}
    device = pick_device(params.train.device)
    layout.mlruns.mkdir(exist_ok=True)
    with tracking.stage_run(layout) as run:
        with registry.registry_lock(mlflow.get_tracking_uri()) as lock:
            client = registry.client_for(layout)
            registry.abandon_interrupted(client, cfg.model_name, run.info.run_id)
            champ = registry.current_alias(client, cfg.model_name, cfg.alias)
            champ_set, champ_note, note = None, "no champion", ""
            if champ is not None:
                mv = client.get_model_version(cfg.model_name, champ)
                check_task(cfg.model_name, champ, mv.tags, TASK)
                champ_set, champ_note = trained_hashes(mv)
            scored = scored_set(trained["test"], trained["train"] + trained["val"],
                                champ_set, champ_note)
            model, arch = load_segmenter(layout.model, device)
            scores, per_image = score(model, test_pairs, scored.keep, arch.num_classes)
            all_scores, _ = score(model, test_pairs, [True] * len(scored.keep),
                                  arch.num_classes)
            champion = None
            if champ is not None:
                champion, note = version_scores(cfg.model_name, champ, cache["classes"],
                                                test_pairs, scored.keep, device)
            decision = decide_iou(scores.miou, per_image,
                                  champion[0].miou if champion else None,
                                  champion[1] if champion else None, params,
                                  champ if champion else None, note, scored,
                                  majority=commonest_class_miou(scores.confusion))
            with tracking.artifact_store_guard():
                info = log_segmenter(layout, cfg.model_name, params)
            version = str(info.registered_model_version)
            log_model_metrics(headline(all_scores), info.model_id, params, layout)
            tags[LINEAGE + "train_hashes"] = log_train_hashes(trained["train"],
                                                              trained["val"], version)
            report = decision.markdown(cfg.model_name, version)
            card = segmentation_card(cfg.model_name, version, params, layout, arch, model,
                                     all_scores, len(scored.keep), validation, tags,
                                     decision, run)
            set_card(client, cfg.model_name, version, card, layout, run.info.run_id)
            describe_registered_model(client, cfg.model_name, cfg.alias, "segmentation")
            lock.check()
            alias = gate.apply(client, cfg.model_name, version, decision, cfg.alias, tags)
        record_decision(layout, cfg.model_name, version, decision, report, card)
    print(report)
    registration = {"model_name": cfg.model_name, "version": version, "alias": alias,
                    "decision": asdict(decision), "run_id": run.info.run_id,
                    "ui_command": tracking.ui_command(layout), "compact": None,
                    "task": TASK, "tags": tags}
    if cfg.compact and alias:  # a compressed copy of the model that now serves
        registration["compact"] = register_compact(params, layout, version)
    elif cfg.compact:
        print(f"compact: nothing registered (v{version} was not promoted)")
    write_json(layout.registration, registration)
    return registration

