"""What a study declares: the settings it varies (:class:`Axis`) or searches (:class:`Search`).

Declarations are checked when they are made, so a typo in an axis name fails at import of the
study script, not as a table of identical rows after an hour of trials.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fbft.core.config import FBFTConfig
from fbft.detectors.base import INFERENCE_FIELDS
from fbft.detectors.registry import methods

# Trial settings that are not FBFTConfig fields.
TRIAL_KEYS = ("shots", "method")
HEADLINE = {
    "i_auroc": "I-AUROC",
    "aupro_30": "AUPRO@30%",
    "aupro_5": "AUPRO@5%",
    "aupro_5_q1": "Q1 AUPRO@5%",
    "rho_5": "ρ@5%",
}


def layer_pair(text: str) -> tuple[int, int]:
    """``"8,12"`` / ``"8-12"`` -> ``(8, 12)`` (1-indexed blocks j < k)."""
    parts = [p for p in text.replace("-", ",").replace(" ", ",").split(",") if p]
    try:
        j, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layer pair {text!r}: write two block numbers like 8,12"
        ) from None
    return j, k


def shots(text: str) -> int | str:
    """A positive number of training images per category, or ``full`` (the whole set)."""
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"shots {text!r}: give a positive number of images per category or 'full'"
        )
    return value


def method(text: str) -> str:
    """A registered detector method (``fbft``, ``patchcore``, ``spade``, ...)."""
    if text not in methods():
        raise argparse.ArgumentTypeError(f"method {text!r}: choose {', '.join(methods())}")
    return text


def backbone_at_size(text: str) -> str:
    """``timm_name@size`` (e.g. ``vit_base_patch16_224.augreg_in21k_ft_in1k@224``)."""
    name, _, size = text.rpartition("@")
    if not name or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(
            f"backbone {text!r}: write a timm name and an input side, like vit_name@224"
        )
    return text


def backbone_changes(value: str) -> dict[str, Any]:
    """Config changes of a ``name@size`` backbone choice."""
    name, _, size = value.rpartition("@")
    return {"backbone": name, "image_size": int(size)}


def show(value: Any) -> str:
    """How a setting reads in tables, run names and tags: ``(8, 12)`` -> ``8,12``."""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Axis:
    """A varied setting: its trial key (an FBFTConfig field or ``shots``/``method``), its flag,
    default values and help. ``changes`` turns a value into config changes (default
    ``{name: value}``). Inference-side settings (fusion, distance, blur) are evaluated from one
    fit per trial; the others make trials of their own."""

    name: str
    flag: str
    default: tuple[Any, ...]
    help: str
    parse: Callable[[str], Any] = str
    changes: Callable[[Any], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        known = {f.name for f in fields(FBFTConfig)} | set(TRIAL_KEYS)
        if self.name not in known:
            raise ValueError(
                f"Axis {self.name!r} (flag {self.flag}) is not a setting a trial knows: use an "
                f"FBFTConfig field or one of {', '.join(TRIAL_KEYS)}"
            )
        if not self.flag.startswith("--"):
            raise ValueError(f"Axis {self.name!r}: flag {self.flag!r} must start with --")

    @property
    def dest(self) -> str:
        """The argparse destination of the flag."""
        return self.flag[2:].replace("-", "_")

    @property
    def inference(self) -> bool:
        """Whether the axis needs no new fit (evaluated as a variant of one trained detector)."""
        return self.name in INFERENCE_FIELDS and self.changes is None

    def config_changes(self, value: Any) -> dict[str, Any]:
        return dict(self.changes(value)) if self.changes else {self.name: value}


@dataclass(frozen=True)
class Search:
    """An Optuna search: a Tune search space over FBFTConfig fields (given the backbone's
    number of blocks), and the metric to maximise."""

    space: Callable[[int], dict[str, Any]]
    metric: str = "aupro_5"


@dataclass(frozen=True)
class Study:
    """A study: a name, a title, and either grid axes (the table's rows) or a search."""

    name: str
    title: str
    axes: tuple[Axis, ...] = ()
    search: Search | None = None
    columns: dict[str, str] = field(default_factory=lambda: dict(HEADLINE))

    def __post_init__(self) -> None:
        flags = [a.flag for a in self.axes]
        if len(set(flags)) != len(flags):
            raise ValueError(f"study {self.name!r}: two axes share a flag ({flags})")
        if self.axes and self.search is not None:
            raise ValueError(f"study {self.name!r}: give grid axes or a search, not both")

    @property
    def script(self) -> str:
        return f"studies/{self.name.replace('-', '_')}.py"

    @property
    def training_axes(self) -> tuple[Axis, ...]:
        return tuple(a for a in self.axes if not a.inference)

    @property
    def inference_axes(self) -> tuple[Axis, ...]:
        return tuple(a for a in self.axes if a.inference)
