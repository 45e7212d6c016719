"""Detectors by method name, as timm chooses models by name: the one place method names live.

``register_detector("name")`` decorates a detector class; the built-in methods are listed here by
module so that naming them (``methods()``, a study's ``--help``) imports neither torch nor the
detectors; a class is imported the first time its method is used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

# Built-in methods -> "module:Class" (imported on first use).
_BUILTIN = {
    "fbft": "fbft.detectors.fbft:FBFT",
    "patchcore": "fbft.detectors.patchcore:PatchCore",
    "spade": "fbft.detectors.spade:SPADE",
}
_REGISTRY: dict[str, type] = {}
DEFAULT_METHOD = "fbft"  # what a study trial runs unless it varies the method
# The baselines' named presets: the published methods, or the maps FBFT's table used to show.
BASELINE_PRESETS = ("paper", "fbft-maps")


def register_detector(name: str) -> Callable[[type], type]:
    """Class decorator: make a detector class available as ``name`` (sets ``cls.method``)."""

    def add(cls: type) -> type:
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"detector method {name!r} is already registered to {known}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return add


def methods() -> tuple[str, ...]:
    """Every method name a study or a saved file may use (built-in first, then registered)."""
    return tuple(dict.fromkeys([*_BUILTIN, *_REGISTRY]))


def detector_class(method: str) -> type:
    """The class registered as ``method`` (a clear error naming the known methods)."""
    if method not in _REGISTRY and method in _BUILTIN:
        module, _, _ = _BUILTIN[method].partition(":")
        importlib.import_module(module)  # registers it
    if method not in _REGISTRY:
        known = ", ".join(methods())
        raise ValueError(f"unknown detector method {method!r}; choose one of {known}")
    return _REGISTRY[method]


def create_detector(method: str, config: Any = None, preset: str | None = None) -> Any:
    """A detector of ``method`` on the teacher that ``config`` (an FBFTConfig or a mapping of
    its fields: teacher, map settings, seed, device) describes; ``preset`` names a baseline
    preset (``paper``, ``fbft-maps``; None = FBFT's own map settings)."""
    from fbft.core.config import FBFTConfig
    from fbft.core.device import resolve_device
    from fbft.core.teacher import make_teacher

    cls = detector_class(method)
    cfg = config if isinstance(config, FBFTConfig) else FBFTConfig.from_dict(dict(config or {}))
    teacher = make_teacher(cfg).to(resolve_device(cfg.device))
    return cls.from_fbft_config(cfg, teacher, preset)


def build(method: str, config: Mapping[str, Any], preset: str | None = None) -> tuple[Any, Any]:
    """A detector of ``method`` and its teacher (what a study job needs: the baselines read the
    same teacher tokens)."""
    detector = create_detector(method, config, preset)
    return detector, detector.teacher


def saved_method(path: str | os.PathLike[str]) -> str:
    """The method a saved detector file records (files before format 2: FBFT's)."""
    from fbft.detectors.saved import read_detector

    return read_detector(path).method


def load_detector(
    path: str | os.PathLike[str], device: str | None = None, weights: str | None = None
) -> Any:
    """Any saved detector, by the method its file records; ``device`` overrides where it runs,
    ``weights`` where its teacher's weights come from (checked against the recorded ones)."""
    return detector_class(saved_method(path)).load(path, device=device, weights=weights)
