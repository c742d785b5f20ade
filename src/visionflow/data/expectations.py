"""The data gate's Great Expectations suite: the expectations built from `validate` params,
the tables they run on (files, usable images, classes), a real GX ephemeral context with Data
Docs, and a memo of results and Data Docs keyed by everything they depend on (manifest
content, suite, labels, GX version, this file), so unchanged data re-validates in seconds
without importing GX (which is why GX and pandas are imported inside the functions)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.files import atomic_dir
from visionflow.core.layout import Layout
from visionflow.data.manifest import usable_rows


@dataclass
class Check:
    """One expectation: GX class name, kwargs, which table it runs on, plain description.

    kind "hard": any failure fails the gate; "budget": the quarantine budget (fails the
    gate when more than `validate.max_quarantine_fraction` of the files are unusable)."""

    table: str
    expectation: str
    kwargs: dict[str, Any]
    description: str
    kind: str = "hard"


def build_checks(params: Params, labels: list[str]) -> list[Check]:
    v = params.validate_
    budget = v.max_quarantine_fraction
    return [
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "quarantine_reason", "value_set": [""], "mostly": 1.0 - budget},
              f"usable files (not quarantined) are at least {1 - budget:.2%} of all files "
              f"(validate.max_quarantine_fraction={budget})", "budget"),
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "decodable", "value_set": [True], "mostly": 1.0 - budget},
              f"at least {1 - budget:.2%} of files decode as images", "budget"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "label", "value_set": labels},
              "every image carries a known label" + (
                  " (validate.labels)" if v.labels else " (the class folders of train)")),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "width", "min_value": v.min_width, "max_value": v.max_width},
              f"image width within {v.min_width}..{v.max_width} px"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "height", "min_value": v.min_height, "max_value": v.max_height},
              f"image height within {v.min_height}..{v.max_height} px"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "mode", "value_set": v.allowed_modes},
              f"image modes in {v.allowed_modes}"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "bytes", "max_value": v.max_bytes},
              f"file size at most {v.max_bytes} bytes"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "splits_sharing_file", "value_set": [1]},
              "no file (by sha256) appears in two splits"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "duplicate_in_split", "value_set": [False],
               "mostly": 1.0 - v.max_duplicate_rate},
              f"duplicates within a split at most {v.max_duplicate_rate:.2%}"),
        Check("classes", "ExpectColumnMinToBeBetween",
              {"column": "train_count", "min_value": v.min_images_per_class},
              f"at least {v.min_images_per_class} training images per class"),
        Check("classes", "ExpectColumnValuesToBeInSet",
              {"column": "in_train", "value_set": [True]},
              "every val/test class also appears in train"),
        Check("classes", "ExpectColumnMaxToBeBetween",
              {"column": "imbalance_ratio", "max_value": v.max_imbalance_ratio},
              f"largest/smallest class ratio at most {v.max_imbalance_ratio}"),
    ]


def _tables(rows: list[dict[str, Any]], labels: list[str], empty_classes: list[str]):
    import pandas as pd

    files = pd.DataFrame(rows)
    files["decodable"] = files["decodable"].astype(bool)
    # "images": what training would use (quarantined files, leaked copies included, are out)
    images = files[(files["quarantine_reason"] == "") & files["decodable"]].copy()
    for col in ("width", "height", "bytes"):
        images[col] = pd.to_numeric(images[col])
    images["splits_sharing_file"] = images.groupby("sha256")["split"].transform("nunique")
    images["duplicate_in_split"] = images.duplicated(["split", "sha256"], keep="first")
    train = Counter(r["label"] for r in usable_rows(rows) if r["split"] == "train")
    all_labels = sorted({r["label"] for r in usable_rows(rows)} | set(labels)
                        | set(empty_classes))
    smallest = max(1, min((train[c] for c in all_labels), default=1))
    biggest = max((train[c] for c in all_labels), default=0)
    classes = pd.DataFrame([
        {"label": c, "train_count": train[c], "in_train": train[c] > 0,
         "imbalance_ratio": biggest / smallest}
        for c in all_labels
    ], columns=["label", "train_count", "in_train", "imbalance_ratio"])
    return {"files": files, "images": images, "classes": classes}


_JINJA_CACHE: Any = None


def _share_jinja_bytecode() -> None:
    """GX builds a fresh jinja Environment per rendered page and recompiles every
    template (~2/3 of a Data Docs build); share one in-memory bytecode cache instead."""
    global _JINJA_CACHE
    if _JINJA_CACHE is not None:
        return
    try:
        import jinja2
        from great_expectations.render.view import view as gx_view

        class _Memory(jinja2.BytecodeCache):
            def __init__(self) -> None:
                self.store: dict[str, bytes] = {}

            def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
                if bucket.key in self.store:
                    bucket.bytecode_from_string(self.store[bucket.key])

            def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
                self.store[bucket.key] = bucket.bytecode_to_string()

        cache = _Memory()
        original = gx_view.DefaultJinjaView.__init__

        def init(self, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            env = getattr(self, "env", None)
            if isinstance(env, jinja2.Environment) and env.bytecode_cache is None:
                env.bytecode_cache = cache

        gx_view.DefaultJinjaView.__init__ = init
        _JINJA_CACHE = cache
    except Exception:  # another GX/jinja layout: build docs the slow way
        _JINJA_CACHE = False


def run_gx(checks: list[Check], tables: dict[str, Any], docs_dir: Path | None) -> list[dict]:
    """Run the suite with a real GX ephemeral context; optionally build Data Docs."""
    import great_expectations as gx

    # its one INFO line names a temporary folder GX removes itself: nothing to act on
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    if docs_dir is not None:
        _share_jinja_bytecode()
        ctx.add_data_docs_site(site_name="local", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = ctx.data_sources.add_pandas("visionflow")
    results = []
    for table, df in tables.items():
        table_checks = [c for c in checks if c.table == table]
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"visionflow_{table}"))
        for c in table_checks:
            suite.add_expectation(getattr(gx.expectations, c.expectation)(
                **c.kwargs, description=c.description, meta={"kind": c.kind}))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["local"])] \
            if docs_dir is not None else []
        cp = ctx.checkpoints.add(gx.Checkpoint(
            name=f"cp_{table}", validation_definitions=[vd], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5}))
        run = cp.run(batch_parameters={"dataframe": df})
        for vr in run.run_results.values():
            for r in vr.results:
                results.append(_result_row(table, r, df))
    by_key = {(c.table, c.kwargs.get("column"), c.description): c for c in checks}
    for r in results:
        check = by_key.get((r["table"], r["column"], r["description"]))
        r["kind"] = check.kind if check else "hard"
        if not r["success"] and not r["examples"] and check is not None:
            r["examples"] = _aggregate_examples(check, tables[check.table])
    return results


def _aggregate_examples(check: Check, df: Any) -> list[str]:
    """Examples for the per-class aggregate expectations (GX lists none for them)."""
    if check.table != "classes" or df.empty:
        return []
    if check.kwargs.get("column") == "train_count":
        low = df[df["train_count"] < check.kwargs["min_value"]].sort_values("train_count")
        return [str(v) for v in low["label"][:5]]
    if check.kwargs.get("column") == "imbalance_ratio":
        ordered = df.sort_values(["train_count", "label"])
        return [f"{ordered['label'].iloc[-1]} ({ordered['train_count'].iloc[-1]})",
                f"{ordered['label'].iloc[0]} ({ordered['train_count'].iloc[0]})"]
    return []


def _result_row(table: str, r: Any, df: Any) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    examples: list[str] = []
    idx = res.get("partial_unexpected_index_list") or []
    if idx and "path" in df.columns:
        examples = [str(df.loc[i, "path"]) if i in df.index else str(i) for i in idx[:5]]
    elif idx and "label" in df.columns:
        examples = [str(df.loc[i, "label"]) for i in idx[:5] if i in df.index]
    elif not examples:
        examples = [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]]
    observed = res.get("observed_value", res.get("unexpected_percent"))
    if res.get("unexpected_percent") is not None:
        observed = f"{res['unexpected_count']} unexpected ({res['unexpected_percent']:.2f}%)"
    return {
        "table": table,
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column"),
        "description": cfg.description,
        "success": bool(r.success),
        "observed": observed if observed is None or isinstance(observed, str | int | float)
        else str(observed),
        "examples": examples,
    }


def _suite_key(layout: Layout, checks: list[Check], labels: list[str],
               empty_classes: list[str]) -> str:
    """Hash of everything the suite's results and Data Docs depend on."""
    h = hashlib.sha256()
    with layout.manifest.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps([[asdict(c) for c in checks], labels, empty_classes,
                         version("great_expectations")], sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def run_suite(checks: list[Check], rows: list[dict[str, Any]], labels: list[str],
              empty_classes: list[str], layout: Layout, memo: bool) -> tuple[list[dict], dict]:
    """Results of the suite and Data Docs in `layout.data_docs`, memoised when `memo`."""
    memo_dir = layout.suite_memo
    key = _suite_key(layout, checks, labels, empty_classes) if memo else ""
    if memo:
        try:
            if (memo_dir / "key").read_text() == key:
                results = json.loads((memo_dir / "results.json").read_text())
                with atomic_dir(layout.data_docs) as docs:
                    shutil.copytree(memo_dir / "data_docs", docs, dirs_exist_ok=True)
                return results, {"memo": "hit", "key": key[:16]}
        except (OSError, ValueError):
            pass  # no or broken memo: run GX
    tables = _tables(rows, labels, empty_classes)
    with atomic_dir(layout.data_docs) as docs:
        results = run_gx(checks, tables, docs)
    if memo:
        try:
            with atomic_dir(memo_dir) as tmp:
                shutil.copytree(layout.data_docs, tmp / "data_docs")
                (tmp / "results.json").write_text(json.dumps(results))
                (tmp / "key").write_text(key)  # last: a memo without key is ignored
        except OSError:
            pass
    return results, {"memo": "miss" if memo else "off", "key": key[:16]}
