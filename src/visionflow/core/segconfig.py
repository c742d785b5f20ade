"""The `segmentation:` section of params.yaml (pydantic only): what a `task: segmentation`
project trains, how it augments, when its data drifted and what its gate asks for.

The rest comes from the shared sections: `data.source` and the split fractions, `seed`,
`train.device` / `threads` / `pretrained` (a local weights file: transfer learning as for
classifiers), `validate.drift` (the mode) and `max_quarantine_fraction`, `register.*`
(`min_delta` and `alpha` then read in mIoU and for the paired per-image IoU test).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

TASKS = ("classification", "segmentation")
SEG_MODEL_NAMES = (
    "unet",
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


class SegmentationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("unet", description="see model/segmentation.py")
    model_kwargs: dict[str, Any] = Field({"width": 16, "depth": 3},
                                         description="unet: width, depth")
    image_size: int = Field(64, ge=8, description="train crop side (eval: each image's own)")
    epochs: int = Field(8, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-3, gt=0, description="AdamW, cosine schedule")
    weight_decay: float = Field(1e-4, ge=0)
    crop_scale: tuple[float, float] = Field((0.4, 1.4), description="crop area / image area; "
                                            "above 1 zooms out (padding is ignored)")
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    drift_psi: float = Field(0.1, gt=0, description="max PSI of the class pixel fractions")
    drift_change: float = Field(0.05, gt=0, description="max change of one class's fraction")
    min_miou: float = Field(0.0, ge=0, le=1, description="the gate's mIoU floor")
    paired_test: Literal["wilcoxon", "bootstrap"] = "wilcoxon"
    paired_required: bool = Field(True, description="promotion needs p <= register.alpha")
    worst_images: int = Field(8, ge=0, le=64, description="overlays in mistakes.png")
    bn_images: int = Field(256, ge=0, description="train pairs (augmented) that set "
                           "BatchNorm's statistics before each evaluation; 0: off")

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SEG_MODEL_NAMES:
            raise ValueError(f"unknown segmentation model, choose one of "
                             f"{', '.join(SEG_MODEL_NAMES)}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _pooled_norm(cls, v: int, info: ValidationInfo) -> int:
        if v < 2 and str(info.data.get("model", "")).startswith("deeplabv3"):
            raise ValueError("DeepLabV3 trains on 2 or more images a batch (the BatchNorm "
                             "after its global pooling cannot normalise one)")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("need 0 < low <= high")
        return v
