"""Pre-flight checks: every input a study can get wrong fails here, named, before any trial."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fbft.core.config import FBFTConfig
from fbft.study.options import Options
from fbft.study.spec import Study


class CheckError(Exception):
    """An input that would fail every trial (exit 2, no traceback)."""


def storage_writable(storage: str) -> None:
    """A local --storage folder must be creatable and writable (remote stores are Tune's)."""
    if "://" in storage:
        return
    probe = Path(storage) / f".fbft-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CheckError(
            f"--storage {storage}: cannot write there ({err.strerror or err}); choose a "
            "writable folder"
        ) from None


def categories(roots: list[str], options: Options) -> dict[str, list[str]]:
    """The categories to run per dataset root: all, or the requested ones that the root has
    (a requested category that no root has is an error)."""
    from fbft.data import DatasetError
    from fbft.data import categories as known_categories

    known: dict[str, list[str]] = {}
    for root in roots:
        try:
            known[root] = known_categories(root, options.format)
        except DatasetError as err:
            raise CheckError(str(err)) from None
    if not options.categories:
        return known
    everywhere = {c for cats in known.values() for c in cats}
    unknown = sorted(set(options.categories) - everywhere)
    if unknown:
        where = ", ".join(roots)
        raise CheckError(
            f"unknown categories {unknown} in {where}; known: {', '.join(sorted(everywhere))}"
        )
    return {r: [c for c in options.categories if c in cats] for r, cats in known.items()}


def resources(options: Options, cluster: dict[str, float], remote: bool) -> None:
    """A trial that asks for more CPUs than the cluster has would wait forever: refuse (local)
    or warn (a remote cluster may scale up). GPUs: :mod:`fbft.study.cluster`."""
    have = float(cluster.get("CPU", 0.0))
    if options.cpus_per_trial > have:
        text = (
            f"--cpus-per-trial {options.cpus_per_trial:g}: the Ray cluster has {have:g} CPU(s) "
            "in all, so no trial could start"
        )
        if not remote:
            raise CheckError(f"{text}; ask for at most {have:g}")
        print(f"warning: {text} unless the cluster scales up", flush=True)


def detector_inputs(study: Study, options: Options, base: FBFTConfig) -> int:
    """Backbone, sizes, layers and map settings of every trial; returns the backbone depth."""
    from fbft.core.teacher import check_backbone, check_image_size, check_layers

    try:
        for axis in study.axes:
            for value in options.axes[axis.name]:
                base.replace(**axis.config_changes(value)) if axis.name not in (
                    "shots",
                    "method",
                ) else None
        backbones = {(base.backbone, base.image_size)}
        if "backbone" in options.axes:
            backbones = {
                (c["backbone"], c["image_size"])
                for c in (
                    study_axis(study, "backbone").config_changes(v)
                    for v in options.axes["backbone"]
                )
            }
        depth = 0
        for backbone, size in sorted(backbones):
            patch, depth = check_backbone(backbone, base.backbone_kwargs)
            for side in options.axes.get("image_size", [size]):
                check_image_size(int(side), patch, backbone)
            for pair in options.axes.get("layers", [base.layers]):
                check_layers(tuple(pair), depth, backbone)
    except (ValueError, TypeError, RuntimeError) as err:
        raise CheckError(str(err)) from None
    return depth


def study_axis(study: Study, name: str) -> Any:
    return next(a for a in study.axes if a.name == name)


def shots(options: Options, data: str, cats: list[str]) -> None:
    """Numeric shot counts must not exceed a category's training images."""
    from fbft.data import DatasetError, open_dataset

    counts = [s for s in options.axes.get("shots", ()) if s != "full"]
    if not counts:
        return
    most = max(int(s) for s in counts)
    for cat in cats:
        try:
            available = len(open_dataset(data, cat, "train", options.format))
        except DatasetError as err:
            raise CheckError(str(err)) from None
        if most > available:
            raise CheckError(
                f"--shots {most}: category {cat!r} has only {available} training images "
                "(use 'full' for all of them)"
            )


def cache_line(cache_root: Path, options: Options) -> str:
    """The cache's place, size and free disk, for the banner."""
    if options.no_cache:
        return "off (--no-cache: the teacher runs in every trial)"
    from fbft.cache.admin import info
    from fbft.cache.common import human_bytes
    from fbft.cache.files import free_bytes

    folder = cache_root / "features"
    size = info(folder)["bytes"] if folder.exists() else 0
    free = free_bytes(folder)  # the cache's own filesystem, also while it does not exist yet
    limit = f", limit {options.cache_max_gb:g} GB" if options.cache_max_gb else ""
    return (
        f"{folder}: {human_bytes(size)} used, {human_bytes(free)} free on disk, "
        f"{options.cache_dtype}{limit}"
    )
