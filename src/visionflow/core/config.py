"""Typed configuration: `params.yaml` is the single source, loaded into `Params`.

Every error is reported as one line naming the key and the offending value,
before any work starts (see `load_params`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from visionflow.core.dataconfig import (  # noqa: F401  (the data section, re-exported)
    SOURCE_SCHEMES,
    DataConfig,
    shard_cache_floor,
    source_scheme,
)
from visionflow.core.segconfig import TASKS, SegmentationConfig
from visionflow.core.tuneconfig import TuneConfig, check_space

STAGE_NAMES = ("validate", "pack", "train", "evaluate", "compress", "register")
# How fast or how visibly a stage runs, never what it produces: dvc.yaml does not track
# these keys (changing one leaves every stage up to date) and a run's identity leaves them out.
RUNTIME_KEYS = ("data.workers", "data.shard_cache_bytes", "validate.workers", "validate.cache",
                "train.threads", "train.progress", "train.checkpoint_steps", "train.rdzv_endpoint",
                "train.rdzv_id")
MODEL_NAMES = (
    "alexnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet_bc",
    "fast",
)


# the registered compression methods (`compression.sweep.register_method`), in sweep order
COMPRESS_METHODS = ("int8", "prune", "structured", "lowrank", "distill", "pt2e")


def _known_model(v: str) -> str:
    if v not in MODEL_NAMES:
        raise ValueError(f"unknown model, choose one of {', '.join(MODEL_NAMES)}")
    return v


ModelName = Annotated[str, AfterValidator(_known_model)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Pillow image modes (as stored in the file) that `validate.allowed_modes` may name
IMAGE_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
               "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ValidateConfig(_Section):
    labels: list[str] | None = None
    min_images_per_class: int = Field(5, ge=1)
    max_imbalance_ratio: float = Field(20.0, ge=1)
    min_width: int = Field(8, ge=1)
    min_height: int = Field(8, ge=1)
    max_width: int = Field(8192, ge=1)
    max_height: int = Field(8192, ge=1)
    allowed_modes: list[str] = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16"]
    max_bytes: int = Field(50_000_000, gt=0)
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard")
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_quarantine_fraction: float = Field(0.0, ge=0, le=1)
    workers: int = Field(0, ge=0, description="0 = all cores")
    cache: bool = Field(True, description="reuse manifest rows and suite results if unchanged")
    drift: Literal["warn", "fail", "off"] = "warn"
    drift_class_psi: float = Field(0.2, gt=0, description="max PSI of the train class mix")
    drift_pixel_shift: float = Field(0.05, gt=0, description="max change of channel mean/std")
    drift_size_psi: float = Field(0.2, gt=0, description="max PSI of the image-size mix")

    @field_validator("drift", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false (and `on` as true)
        return {False: "off", True: "warn"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must be null (take labels from train) or a non-empty list")
            if len(set(v)) != len(v):
                raise ValueError("labels must be unique")
        return v

    @field_validator("max_width", "max_height")
    @classmethod
    def _max_not_below_min(cls, v: int, info: ValidationInfo) -> int:
        low_key = "min_" + info.field_name.removeprefix("max_")
        low = info.data.get(low_key)
        if low is not None and v < low:
            raise ValueError(f"must be >= validate.{low_key} ({low})")
        return v

    @field_validator("allowed_modes")
    @classmethod
    def _known_modes(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in IMAGE_MODES]
        if unknown:
            raise ValueError(f"unknown image mode(s) {unknown}, use {', '.join(IMAGE_MODES)}")
        if not v:
            raise ValueError("must name at least one image mode")
        return v


class AugmentConfig(_Section):
    """Batch augmentation policy applied on the training device."""

    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    alternate_flip: bool = Field(False, description="flip a fixed random `hflip` share, then "
                                 "every image each odd epoch (instead of a fresh draw)")
    translate: int = Field(2, ge=0, description="max shift in pixels (pad + random crop)")
    cutout: int = Field(4, ge=0, description="square cutout side in pixels, 0 = off")
    cutout_p: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_p: float = Field(0.0, ge=0, le=1, description="probability a batch is mixed")


class TrainConfig(_Section):
    model: ModelName = "fast"
    epochs: int = Field(4, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.5, gt=0)
    optimizer: Literal["sgd", "adamw", "muon"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    muon_lr: float = Field(0.24, gt=0, description="muon: lr of the conv filters")
    muon_momentum: float = Field(0.6, ge=0, lt=1, description="muon: filters' momentum")
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    warmup_start: float = Field(0.0, ge=0, le=1, description="lr factor at the first step")
    schedule: Literal["cosine", "onecycle", "linear", "constant"] = "linear"
    lr_end: float = Field(0.0, ge=0, le=1, description="lr factor at the last step")
    decay_biases: bool = Field(False, description="weight decay on biases and norms too")
    bias_lr_scale: float = Field(1.0, gt=0, description="lr factor of norm-layer biases")
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ema_every: int = Field(1, ge=1, description="EMA update every N steps")
    ema_ramp: float = Field(0.0, ge=0, description="decay x (step / total) ** ramp")
    lookahead: bool = Field(False, description="reset the weights to the average each update")
    whiten_bias_epochs: int | None = Field(None, ge=0, description="fast: epochs the "
                                           "whitening bias trains (null = all)")
    dirac_init: bool = Field(False, description="fast: 3x3 convs start as identities")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: Literal[True, False, "auto"] = Field("auto", description="torch.compile the model; "
                                             "auto: on CUDA")
    deterministic: bool = False
    threads: int = Field(0, ge=0, description="CPU threads, 0 = torch default")
    pretrained: str | None = Field(None, description="local weights file, or torchvision:NAME")
    freeze_epochs: int = Field(0, ge=0, description="epochs with the pretrained backbone frozen")
    backbone_lr_mult: float = Field(0.1, gt=0, description="backbone lr factor when fine-tuning")
    early_stop_patience: int | None = Field(None, gt=0, description="epochs without val gain")
    time_budget_s: float | None = Field(None, gt=0)
    calibrate: bool = Field(True, description="fit a softmax temperature on the val split")
    checkpoint_steps: int = Field(100, ge=1, description="shards (either task): a checkpoint "
                                  "every N steps too (resumes mid-epoch); not part of the "
                                  "run's identity")
    progress: bool = True
    nodes: int = Field(1, ge=1, description="machines taking part (torchrun --nnodes)")
    procs_per_node: int = Field(1, ge=1, description="processes per machine (one per GPU; "
                                "on CPU, gloo processes)")
    rdzv_endpoint: str | None = Field(None, validate_default=True,
                                      description="host:port of the c10d rendezvous, "
                                      "on one of the nodes; null = this machine alone")
    rdzv_id: str = Field("visionflow", min_length=1, description="the job id all nodes share")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", v):
            raise ValueError("expected host:port (e.g. 10.0.0.1:29400)")
        if v is None and (info.data.get("nodes") or 1) > 1:
            raise ValueError("train.nodes > 1 needs the rendezvous host:port of one node")
        return v


class EvaluateConfig(_Section):
    topk: list[int] = [1, 3, 5]
    batch_size: int = Field(512, gt=0)
    tta: Literal[0, 1, 2] = Field(0, description="TTA level: 0 none, 1 mirror, 2 mirror + "
                                  "1-pixel translates (false/true read as 0/1)")
    calibration_bins: int = Field(15, ge=2, le=100, description="bins for ECE / reliability")
    mistakes: int = Field(16, ge=0, le=100, description="most confident mistakes in the grid")

    @field_validator("tta", mode="before")
    @classmethod
    def _tta_bool(cls, v: Any) -> Any:
        return int(v) if isinstance(v, bool) else v  # the old flip switch

    @field_validator("topk")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("must be a non-empty list of integers >= 1")
        return sorted(set(v))


class CompressConfig(_Section):
    """The compress stage (#6): variants searched, the accuracy budget and the objective.

    Methods: `int8` ONNX Runtime QDQ static int8 (per-channel); `prune` unstructured magnitude
    sparsity (report only: no gain in dense kernels); `structured` channel pruning
    (torch-pruning) + fine-tune; `lowrank` Tucker-2 / SVD + fine-tune; `distill` a smaller
    zoo student; `pt2e` torchao PT2E X86 int8 (measured, not deployable).
    """

    methods: list[str] = Field(["int8", "prune", "structured"],
                               description="of COMPRESS_METHODS, run in its order")
    max_top1_drop: float = Field(1.0, ge=0, le=100, description="budget, in top-1 points")
    max_miou_drop: float = Field(1.0, ge=0, le=100,
                                 description="segmentation models: budget, in mIoU points")
    objective: Literal["size", "macs", "cpu_latency"] = "size"
    combine: bool = Field(True, description="also int8 of each fp32 variant within budget")
    stop_at_first_miss: bool = Field(
        True, description="try strengths mildest first; skip stronger ones after a miss")
    calibration_images: int = Field(256, gt=0)
    int8_keep_first_conv: bool = Field(True, description="the stem conv stays fp32 in int8")
    prune_amount: float = Field(0.5, gt=0, lt=1)
    structured_ratios: list[float] = Field([0.3], min_length=1,
                                           description="fraction of channels removed")
    structured_steps: int = Field(1, ge=1, description="iterative pruning steps")
    lowrank_energies: list[float] = Field([0.9], min_length=1,
                                          description="singular-value energy kept")
    student_model: ModelName = "fast"
    student_kwargs: dict[str, Any] = Field(
        {"widths": [32, 64, 128]}, description="create_model kwargs that shape its layers")
    finetune_epochs: int = Field(1, ge=0, description="after each pruning step / low-rank")
    finetune_lr: float = Field(1e-3, gt=0)
    finetune_batch_size: int = Field(64, gt=0)
    finetune_images: int | None = Field(None, gt=0, description="train subset, null = all")
    finetune_distill: bool = Field(False, description="fine-tune against the unpruned model")
    distill_epochs: int = Field(3, ge=1, description="student training epochs")
    distill_lr: float = Field(2e-3, gt=0)
    temperature: float = Field(4.0, gt=0)
    distill_alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft term")
    latency_batches: list[int] = Field([1, 32], min_length=1)
    latency_reps: int = Field(20, ge=1, description="timed rounds at batch 1")
    latency_reps_large: int = Field(5, ge=1, description="timed rounds at batches > 1")
    latency_warmup: int = Field(2, ge=0)
    threads: int = Field(1, ge=0, description="CPU threads (timing, fine-tune), 0 = all")
    onnx_min_agreement: float = Field(0.99, ge=0, le=1, description="ORT vs torch top-1")

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in COMPRESS_METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}, choose from "
                             f"{', '.join(COMPRESS_METHODS)}")
        return list(dict.fromkeys(v))

    @field_validator("structured_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError("each ratio must be in (0, 1)")
        return sorted(set(v))

    @field_validator("lowrank_energies")
    @classmethod
    def _energies(cls, v: list[float]) -> list[float]:
        if any(not 0 < e < 1 for e in v):
            raise ValueError("each energy must be in (0, 1)")
        return sorted(set(v), reverse=True)

    @field_validator("latency_batches")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if 1 not in v or any(b < 1 for b in v):
            raise ValueError("batch sizes >= 1, including 1 (the latency objective uses it)")
        return sorted(set(v))


class RegisterConfig(_Section):
    model_name: str = Field("visionflow-classifier", min_length=1)
    min_delta: float = Field(0.0, ge=0, description="top-1 gain needed over the champion")
    alias: str = "champion"
    min_top1: float = Field(0.0, ge=0, le=1, description="absolute top-1 floor to be promoted")
    beat_majority: bool = Field(True, description="top-1 above the commonest test class's share")
    mcnemar: bool = Field(False, description="also require McNemar's exact test p <= alpha")
    alpha: float = Field(0.05, gt=0, le=1, description="McNemar significance level")
    compact: bool = Field(True, description="on promotion, compress's choice as alias `compact`")
    min_test_images: int = Field(30, ge=1, description="fewest test images the gate may judge "
                                 "on, after excluding those either model trained on")


class ScheduleConfig(_Section):
    """`vflow schedule`: when the `retrain` deployment runs (owned by flows/, #7)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    deployment: str = Field("nightly", min_length=1)
    max_lateness_s: float | None = Field(
        21600, gt=0, description="a scheduled run that starts later than this is skipped")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        # (the full check happens when Prefect builds the schedule)
        if not re.fullmatch(r"\s*(@\w+|([\w*/,?-]+\s+){4}[\w*/,?-]+)\s*", v):
            raise ValueError("not a cron expression (five fields, e.g. '0 3 * * *')")
        return v.strip()

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(v)
        except (KeyError, ValueError):
            raise ValueError("unknown time zone (e.g. UTC, Europe/Paris)") from None
        return v


class FlowConfig(_Section):
    """The Prefect flow (flows/retrain.py): retries, timeouts, task cache, schedule."""

    retries: int = Field(2, ge=0, description="per stage, on transient errors only")
    retry_delay_s: float = Field(10.0, ge=0, description="first back-off, doubled each retry")
    retry_jitter: float = Field(0.5, ge=0, description="random extra delay, fraction of it")
    timeout_s: dict[str, float | None] = Field(
        {"validate": 3600, "pack": 3600, "train": 86400, "evaluate": 3600,
         "compress": 7200, "register": 3600},
        description="per-stage Prefect task timeout in seconds, null = none")
    cache: bool = Field(True, description="reuse finished stages: resume at the failed one")
    cache_days: float = Field(30, gt=0)
    mlflow_ui_url: str = Field("http://127.0.0.1:5000", description="for run summary links")
    schedule: ScheduleConfig = ScheduleConfig()

    @field_validator("timeout_s")
    @classmethod
    def _timeouts(cls, v: dict[str, float | None]) -> dict[str, float | None]:
        unknown = sorted(set(v) - set(STAGE_NAMES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}, use {', '.join(STAGE_NAMES)}")
        if any(t is not None and t <= 0 for t in v.values()):
            raise ValueError("timeouts must be > 0 seconds (or null for none)")
        return v


Task = Literal[TASKS]  # type: ignore[valid-type]


class Params(_Section):
    task: Task = "classification"
    seed: int = 0
    preset: str | None = Field(None, description="presets/<name>.yaml merged over params.yaml")
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compress: CompressConfig = CompressConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    flow: FlowConfig = FlowConfig()
    tune: TuneConfig = TuneConfig()
    segmentation: SegmentationConfig = SegmentationConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _shard_cache_holds_every_worker(self) -> Params:
        d, procs = self.data, self.train.procs_per_node
        floor = shard_cache_floor(d.shard_bytes, d.workers, procs)
        if d.shards_url and d.shard_cache_bytes < floor:
            raise ValueError(
                f"data.shard_cache_bytes={d.shard_cache_bytes}: below {floor}, what "
                f"{procs} training process(es) x {max(d.workers, 1)} loader worker(s) x 2 "
                f"shards of data.shard_bytes={d.shard_bytes} hold in the cache; raise it, or "
                "lower data.workers or data.shard_bytes")
        return self

    @model_validator(mode="after")
    def _tune_space_fits(self) -> Params:
        # the error names its key itself (`tune.space.<key>...`): see configfile._format_error
        check_space(self.tune.space, {"train": TrainConfig, "augment": AugmentConfig})
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def identity(self, *sections: str) -> str:
        """A hash of what shapes a run's result: `sections` without `RUNTIME_KEYS` (a train
        checkpoint is resumed only under the same identity)."""
        dumped = self.dump()
        keep = {k: dumped[k] for k in sections}
        for key in RUNTIME_KEYS:
            section, name = key.split(".")
            if isinstance(keep.get(section), dict):
                keep[section].pop(name, None)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
