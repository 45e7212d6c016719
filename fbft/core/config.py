"""FBFTConfig: every setting of one FBFT detector, and the named presets.

Defaults follow the official implementation (repository ``alex-costanzino/L2BT``); where the
paper's text differs, the difference is an option (``lr``: 1e-4 in the code, 1e-3 in the text).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Loss = Literal["cosine", "l2"]
Distance = Literal["l2", "cosine"]
Fusion = Literal["product", "sum", "j", "k"]
Blur = Literal["official", "none"]
Precision = Literal["fp32", "bf16", "fp16"]
Normalize = Literal["imagenet", "backbone"]


@functools.cache
def choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> allowed values of every ``Literal``-typed field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }


def check_choices(config: Any) -> None:
    """A clear error for a ``Literal`` field set to a value it does not allow."""
    cls = type(config)
    for name, allowed in choices(cls).items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(
                f"{cls.__name__}.{name}={value!r} is not one of {', '.join(map(str, allowed))}"
            )


@dataclass(frozen=True)
class FBFTConfig:
    """Settings of one FBFT detector: teacher, students, training and anomaly maps.

    ``layers`` are 1-indexed block numbers as in the paper (``(8, 12)`` = blocks 8 and 12).
    ``weights`` is ``"auto"`` (hub or local cache, else a loudly reported random-init teacher),
    ``"hub"``, ``"random"`` or the path of a checkpoint file (Meta ``.pth``, timm or safetensors).
    ``backbone_kwargs`` override the timm architecture (e.g. ``{"depth": 4, "embed_dim": 64}``
    for a tiny test teacher). ``teacher_seed`` seeds a random-init teacher; ``seed`` seeds the
    students and the batch order. ``student_width`` defaults to the teacher's width D.
    """

    backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m"
    weights: str = "auto"
    layers: tuple[int, int] = (8, 12)
    image_size: int = 1036
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    teacher_seed: int = 0
    student_width: int | None = None
    loss: Loss = "cosine"
    distance: Distance = "l2"
    fusion: Fusion = "product"
    blur: Blur = "official"
    epochs: int = 50
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    precision: Precision = "fp32"
    normalize: Normalize = "imagenet"
    max_token_gb: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(b) for b in self.layers))
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        check_choices(self)
        if len(self.layers) != 2:
            raise ValueError(
                f"FBFTConfig.layers={self.layers!r}: give exactly two 1-indexed block numbers"
                " j < k,"
                " e.g. (8, 12)"
            )
        for name in ("image_size", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"FBFTConfig.{name} must be a positive integer, got {getattr(self, name)!r}"
                )
        if self.max_token_gb is not None and not self.max_token_gb >= 0:
            raise ValueError(
                f"FBFTConfig.max_token_gb must be >= 0 (GB of tokens held in memory) or None "
                f"(automatic), got {self.max_token_gb!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"FBFTConfig.lr must be > 0, got {self.lr!r}")

    def replace(self, **changes: Any) -> FBFTConfig:
        """A copy with some fields changed (validated like a new config)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown FBFTConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FBFTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FBFTConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # The published setting: DINOv2 ViT-B/14 with registers at 1036², blocks 8 and 12.
    "paper": {},
    # What a 2-core CPU machine can run in minutes: ViT-S/14 with registers at 448².
    "cpu": {"backbone": "vit_small_patch14_reg4_dinov2.lvd142m", "image_size": 448},
}


def preset(name: str, **overrides: Any) -> FBFTConfig:
    """The named preset (``"paper"`` or ``"cpu"``), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return FBFTConfig(**{**PRESETS[name], **overrides})
