"""Stage 6, register: log the model to MLflow, register a version, gate the `champion` alias.

The challenger and the current champion are scored by the same code (`mlops.scoring`,
`model.metrics.score_logits`) on the same test images: those that neither of them trained
or validated on (by sha256; every version records its sets as the artifact its
`train_hashes` tag points at). `gate.decide` promotes only when enough test images remain
(`register.min_test_images`) and the floor, the minimum gain and (optionally) McNemar's
exact test all hold, or when there is no champion yet. Everything happens under one lock
per store (`registry.registry_lock`), so concurrent registrations see each other's result.
Each version gets a model card as its description, provenance tags, a signature and an
input example; the gate report (with how many test images were excluded, and why) is
printed, written to `outputs/register/gate_report.md` and logged to the MLflow run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import torch

from visionflow.core.config import Params
from visionflow.core.files import write_json
from visionflow.core.layout import Layout
from visionflow.data.feed import with_images
from visionflow.data.packed import load_packed, split_hashes
from visionflow.mlops import gate, registry, scoring, tracking
from visionflow.mlops.card import model_card, set_card
from visionflow.mlops.compact import register_compact
from visionflow.mlops.gate import Decision, decide, scored_set
from visionflow.mlops.lineage import trained_hashes
from visionflow.mlops.provenance import LINEAGE, version_tags
from visionflow.mlops.publish import (
    describe_registered_model,
    log_model_metrics,
    log_pyfunc,
    log_train_hashes,
    record_decision,
    sample_image,
)
from visionflow.mlops.segmentation_gate import check_task
from visionflow.model.metrics import headline, score_logits
from visionflow.stages import main
from visionflow.tasks.segmentation import register as segmentation

# task -> its own run (params.task; classification is this module's `run`)
TASKS = {"segmentation": segmentation.run}


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str | None
    decision: Decision
    run_id: str
    ui_command: str
    compact: dict[str, Any] | None = None  # the `compact` version, when one was registered


def run(params: Params, layout: Layout) -> Registration:
    if params.task in TASKS:
        return TASKS[params.task](params, layout)
    cfg = params.register_
    validation = json.loads(layout.validation.read_text())
    # shards: the test split decoded through resize + centre crop
    cache = with_images(layout, load_packed(layout.packed), ("test",),
                        params.data.shard_cache_bytes, params.evaluate.batch_size)
    tags = version_tags(params, layout)
    layout.mlruns.mkdir(exist_ok=True)
    target = cache["test_y"]
    trained = {s: split_hashes(cache, s) for s in ("train", "val", "test")}

    with tracking.stage_run(layout) as run:
        uri = mlflow.get_tracking_uri()
        with registry.registry_lock(uri) as lock:
            client = registry.client_for(layout)
            registry.abandon_interrupted(client, cfg.model_name, run.info.run_id)
            ch_logits, model, arch = scoring.trained_logits(layout, cache["test_x"], params)
            scores = score_logits(ch_logits, target, arch.classes, params.evaluate.topk,
                                  params.evaluate.calibration_bins)
            champ = registry.current_alias(client, cfg.model_name, cfg.alias)
            champ_correct, note = None, ""
            champ_set, champ_note = None, "no champion"
            if champ is not None:
                mv = client.get_model_version(cfg.model_name, champ)
                check_task(cfg.model_name, champ, mv.tags, params.task)
                champ_set, champ_note = trained_hashes(mv)
                champ_pred, known, note = scoring.version_predictions(cfg.model_name, champ,
                                                                      cache, params)
                if champ_pred is not None:
                    champ_correct = champ_pred == target
            scored = scored_set(trained["test"], trained["train"] + trained["val"],
                                champ_set, champ_note)
            if champ_correct is not None and not known.all():  # classes added since
                scored = scored.of_classes(known[target].tolist(), [
                    c for c, k in zip(cache["classes"], known.tolist(), strict=True) if not k])
            keep = torch.tensor(scored.keep, dtype=torch.bool)
            kept = target[keep]
            decision = decide((ch_logits.argmax(1) == target)[keep],
                              None if champ_correct is None else champ_correct[keep],
                              cfg,
                              champ if champ_correct is not None else None, note, scored,
                              majority=(float(torch.bincount(kept).max()) / len(kept)
                                        if len(kept) else None))

            with tracking.artifact_store_guard():
                info = log_pyfunc(layout, cfg.model_name, params)
            version = str(info.registered_model_version)
            # the model's own metrics (the version page's), its data, the run's inputs
            log_model_metrics(headline(scores), info.model_id, params, layout)
            tags[LINEAGE + "train_hashes"] = log_train_hashes(trained["train"],
                                                              trained["val"], version)
            report = decision.markdown(cfg.model_name, version)
            sample = sample_image(cache, arch, layout, validation.get("dataset_root", ""))
            card = model_card(cfg.model_name, version, params, layout, arch, model, scores,
                              validation, tags, decision, run, sample)
            set_card(client, cfg.model_name, version, card, layout, run.info.run_id)
            describe_registered_model(client, cfg.model_name, cfg.alias)
            lock.check()  # still ours (a restarted database drops it): else retry it all
            alias = gate.apply(client, cfg.model_name, version, decision, cfg.alias, tags)
        record_decision(layout, cfg.model_name, version, decision, report, card)
    print(report)

    reg = Registration(cfg.model_name, version, alias, decision, run.info.run_id,
                       tracking.ui_command(layout))
    if cfg.compact and alias:  # a compressed copy of the model that now serves
        reg.compact = register_compact(params, layout, version,
                                       sample=sample)
    elif cfg.compact:
        print(f"compact: nothing registered (v{version} was not promoted)")
    write_json(layout.registration, {**asdict(reg), "tags": tags})
    return reg


if __name__ == "__main__":
    main("register", run)
