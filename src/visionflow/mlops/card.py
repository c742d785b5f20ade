"""The model card: each registered version's description (what it is, what it was trained on,
how good it is, where it came from, the gate's decision, how to use it)."""

from __future__ import annotations

import csv
from typing import Any

import yaml

from visionflow.core.config import Params
from visionflow.core.env import hardware
from visionflow.core.layout import Layout
from visionflow.mlops.gate import Decision
from visionflow.mlops.provenance import lineage
from visionflow.model.metrics import headline


def _training_summary(layout: Layout) -> dict[str, Any]:
    if not layout.history.is_file():
        return {}
    with layout.history.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = rows[-1]
    return {
        "epochs": len(rows),
        "seconds": sum(float(r.get("seconds") or 0) for r in rows),
        "final_train_loss": float(last.get("train_loss") or 0),
        "final_val_top1": last.get("val_top1") or "",
        "peak_mem_gb": last.get("peak_mem_gb") or "",
    }


KV_HEADER = ("| | |", "|---|---|")  # a key/value table: no header row on the page
# MLflow's SQL stores keep a version's description in a VARCHAR(5000): PostgreSQL refuses more
DESCRIPTION_LIMIT = 5000
# sections a card too long for it goes without, in order (the params are the run's, the
# per-class IoU its evaluate/per_class.csv)
DROPPED_FIRST = ("## Params", "## Per-class IoU")


def fit_description(card: str, whole: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """`card` as a version's description: whole when it fits `limit`; else without the
    sections of DROPPED_FIRST, then cut at a line, with a last line saying where the whole
    card is (`whole`, e.g. its run's artifact)."""
    if len(card) <= limit:
        return card
    note = f"\n*The card is cut to the registry's {limit:,} characters: the whole card is " \
           f"{whole}.*\n"
    sections = card.split("\n## ")
    for head in DROPPED_FIRST:
        sections = [s for s in sections if not ("## " + s).startswith(head + "\n")]
        text = "\n## ".join(sections)
        if len(text) + len(note) <= limit:
            return text.rstrip("\n") + "\n" + note
    cut = text[:limit - len(note)]
    return cut[:cut.rfind("\n") + 1] + note


def set_card(client: Any, name: str, version: str, card: str, layout: Layout,
             run_id: str) -> None:
    """`card` as the version's description, fitted to the registry; the whole card is the
    run's artifact that `publish.record_decision` logs (register/model_card.md)."""
    client.update_model_version(name, version, description=fit_description(
        card, f"the artifact register/{layout.model_card.name} of run {run_id}"))


def _md_table(rows: list[tuple[str, Any]]) -> list[str]:
    out = list(KV_HEADER)
    out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return out


def for_terminal(card: str) -> str:
    """The card for a terminal (`vflow models show`): its key/value tables as lists, where
    rich would draw an empty header row and a rule above each."""
    out: list[str] = []
    in_kv = False
    for line in card.splitlines():
        if line == KV_HEADER[0] or (in_kv and line == KV_HEADER[1]):
            in_kv = True
        elif in_kv and line.startswith("| ") and line.endswith(" |"):
            key, value = line[2:-2].split(" | ", 1)
            out.append(f"- **{key}**: {value}")
        else:
            in_kv = False
            out.append(line)
    return "\n".join(out)


SAMPLE_NOTE = "a test image of the data this version was trained on"


def data_section(tags: dict[str, str], validation: dict, source: str) -> list[str]:
    counts = validation.get("counts") or {}
    return ["## Data", *_md_table([
        ("data hash (dataset digest)", lineage(tags, "data_hash") or "-"),
        ("DVC data md5", lineage(tags, "dvc_data_md5") or "-"),
        ("source", validation.get("source", source)),
        ("images", f"{validation.get('usable', '?')} usable of "
                   f"{validation.get('files', '?')} files"),
        ("splits", _split_sizes(counts) or "-"),
        ("split scheme", lineage(tags, "split_scheme") or "-"),
    ]), ""]


def metrics_section(metrics: dict[str, float], n_test: Any, title: str = "Test metrics",
                    extra: list[tuple[str, Any]] | None = None) -> list[str]:
    return [f"## {title}", "| metric | value |", "|---|---|",
            *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
            f"| test images | {n_test} |",
            *[f"| {k} | {v} |" for k, v in (extra or [])], ""]


def lineage_section(tags: dict[str, str], run_id: str, experiment_id: str) -> list[str]:
    return ["## Lineage", *_md_table([
        ("data hash", lineage(tags, "data_hash") or "-"),
        ("git commit", lineage(tags, "git_commit") or "-"),
        ("params hash", lineage(tags, "params_hash") or "-"),
        ("dvc.lock hash", lineage(tags, "dvc_lock_hash") or "-"),
        ("source run", f"{run_id} (experiment {experiment_id})"),
        ("training images (sha256)", lineage(tags, "train_hashes") or "-"),
    ]), ""]


def usage_section(name: str, ref: str, sample: tuple[str, str] | None) -> list[str]:
    """How to load this version and predict one image: a real test image and its class."""
    path, label = sample or ("image.png", "")
    expect = f"  # {SAMPLE_NOTE}: expect label {label!r}" if label else ""
    return ["## Use", "```python", "import mlflow, pandas as pd",
            f'model = mlflow.pyfunc.load_model("models:/{name}{ref}")',
            f'image = open("{path}", "rb").read()',
            f'print(model.predict(pd.DataFrame({{"image": [image]}}))["label"][0]){expect}',
            "```", ""]


def model_card(name: str, version: str, params: Params, layout: Layout, arch: Any, model: Any,
               scores: dict[str, Any], validation: dict, tags: dict[str, str],
               decision: Decision, run: Any, sample: tuple[str, str] | None = None) -> str:
    """The version's description: what it is, what it was trained on, how good, provenance."""
    n_params = sum(p.numel() for p in model.parameters())
    train = _training_summary(layout)
    run_tags = dict(getattr(getattr(run, "data", None), "tags", {}) or {})
    p = params.dump()
    classes = ", ".join(arch.classes)
    lines = [
        f"# {name} v{version}: {arch.name}",
        "",
        f"**Gate: {decision.label}.** {decision.reason}",
        "",
        "## Model",
        *_md_table([
            ("architecture", f"{arch.name}, {n_params:,} parameters"),
            ("input", f"{arch.image_size}x{arch.image_size}, {arch.in_channels} channel(s), "
                      "image bytes or arrays (preprocessing inside)"),
            ("classes", f"{arch.num_classes}: {classes[:1500]}"),
            ("output", "label, score, top-k probabilities (JSON)"),
        ]),
        "",
        *data_section(tags, validation, params.data.source),
        *metrics_section(headline(scores), scores["n"]),
        "## Training",
        *_md_table([
            ("epochs", train.get("epochs", "-")),
            ("training time", f"{train['seconds']:.1f} s" if train else "-"),
            ("final train loss", f"{train['final_train_loss']:.4f}" if train else "-"),
            ("training device", run_tags.get("device", "-")),
            ("hardware (registering host)", hardware()),
        ]),
        "",
        *lineage_section(tags, run.info.run_id, run.info.experiment_id),
        "## Params",
        "```yaml",
        *_yaml_lines({k: p[k] for k in ("seed", "data", "augment", "train", "evaluate",
                                        "register") if k in p}),
        "```",
        "",
        decision.markdown(name, version),
        *usage_section(name, f"/{version}", sample),
    ]
    return "\n".join(lines) + "\n"


def _split_sizes(counts: Any) -> str:
    if not isinstance(counts, dict):
        return ""
    total: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, dict):  # {split: {class: n}} or {class: {split: n}}
            for k2, v2 in value.items():
                if isinstance(v2, int | float):
                    split = key if key in ("train", "val", "test") else k2
                    total[split] = total.get(split, 0) + int(v2)
        elif isinstance(value, int | float):
            total[key] = total.get(key, 0) + int(value)
    return ", ".join(f"{k} {v}" for k, v in total.items())


class _CardDumper(yaml.SafeDumper):
    """params.yaml's own shape: a key a line, lists (`crop_scale`, `methods`) inline."""


_CardDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))


def _yaml_lines(obj: dict[str, Any]) -> list[str]:
    return yaml.dump(obj, Dumper=_CardDumper, sort_keys=False,
                     default_flow_style=False).splitlines()
