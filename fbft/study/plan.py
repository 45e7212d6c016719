"""What a study will run, decided on the driver before any trial: the dataset roots and their
categories (the synthetic benchmark made once per category when no ``--data`` is given), the
preset from the cluster's GPUs, the base detector config with the teacher weights resolved
once, the grid's trials and the inference-side variants each trial evaluates from one fit.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fbft.core.config import PRESETS, FBFTConfig
from fbft.study import checks, preflight
from fbft.study.cells import Cell
from fbft.study.checks import CheckError
from fbft.study.options import Options
from fbft.study.spec import Study, show

SYNTHETIC = {"image_size": 1024, "n_train": 60, "n_test": 24, "seed": 0}


@dataclass(frozen=True)
class DataPlan:
    """The dataset roots and their categories (the synthetic benchmark made when no --data)."""

    roots: tuple[str, ...]
    synthetic: bool
    categories: dict[str, list[str]]  # per dataset root


@dataclass(frozen=True)
class Plan:
    """What the checks decided: data, preset, the base detector config and the grid."""

    data: DataPlan
    preset: str
    preset_reason: str
    base: FBFTConfig
    depth: int
    cells: tuple[Cell, ...]
    variants: tuple[dict[str, Any], ...]
    variant_axes: tuple[dict[str, str], ...]
    gpus_per_trial: float = 0.0  # asked of Ray by each trial (GPU intent, kept on --resume)


def plan_data(study: Study, options: Options, cache_root: Path) -> DataPlan:
    """The data roots and categories, checked (before Ray starts)."""
    roots, synthetic = _data_roots(options, cache_root)
    if study.search is not None and len(roots) > 1:
        raise CheckError("a search runs on one dataset: give one --data root")
    if synthetic:  # made before its categories are read: only the ones asked for
        from fbft.data.synthetic import CATEGORIES

        unknown = sorted(set(options.categories) - set(CATEGORIES))
        if unknown:
            raise CheckError(
                f"unknown categories {unknown} in the synthetic benchmark; known: "
                f"{', '.join(CATEGORIES)}"
            )
        ensure_synthetic(Path(roots[0]), list(options.categories or CATEGORIES), SYNTHETIC)
    cats = checks.categories(roots, options)
    preflight.before_ray(options, cache_root, cats)
    return DataPlan(tuple(roots), synthetic, cats)


def with_cluster(
    study: Study,
    options: Options,
    data: DataPlan,
    resources: dict,
    address: Any,
    saved: dict[str, Any] | None = None,
) -> Plan:
    """Preset and GPUs per trial by intent (:mod:`fbft.study.cluster`; ``saved``: the ones a
    resumed study started with), the base config with weights resolved, checked inputs."""
    from fbft.core.teacher import resolve_weights
    from fbft.study.cluster import capacity, decide

    checks.resources(options, resources, remote=bool(address))
    intent = decide(options, capacity(resources), remote=bool(address), saved=saved)
    preset, reason = intent.preset, intent.reason
    try:
        base = FBFTConfig(**{**PRESETS[preset], **options.config_changes()})
        base = base.replace(weights=resolve_weights(base.backbone, base.weights))
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        raise CheckError(str(err)) from None
    depth = checks.detector_inputs(study, options, base)
    for root, cats in data.categories.items():
        checks.shots(options, root, cats)
    inference = study.inference_axes
    combos = list(itertools.product(*(options.axes[a.name] for a in inference))) or [()]
    variants = tuple({a.name: v for a, v in zip(inference, c, strict=True)} for c in combos)
    return Plan(
        data=data,
        preset=preset,
        preset_reason=reason,
        base=base,
        depth=depth,
        cells=_cells(study, options, data.categories),
        variants=variants,
        variant_axes=tuple({k: show(v) for k, v in v.items()} for v in variants),
        gpus_per_trial=intent.gpus_per_trial,
    )


def _cells(study: Study, options: Options, cats: dict[str, list[str]]) -> tuple[Cell, ...]:
    """The grid's trials: training axes × seeds × datasets × categories (search: one template).
    The category varies fastest, so trials that run together read different images: none
    waits for another's teacher pass of the same image."""
    axes = study.training_axes
    if study.search is not None:
        ((root, names),) = cats.items()
        return (Cell(root, tuple(names), seed=options.seeds[0]),)
    cells = []
    for values in itertools.product(*(options.axes[a.name] for a in axes)):
        for seed in options.seeds:
            for root, names in cats.items():
                for cat in names:
                    shown = {"dataset": Path(root).name} if len(cats) > 1 else {}
                    cell = _cell(axes, values, seed, root, cat, shown)
                    cells.append(replace(cell, index=len(cells)))
    return tuple(cells)


def _cell(
    axes: Sequence[Any], values: Sequence[Any], seed: int, root: str, cat: str, shown: dict
) -> Cell:
    fields: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    for axis, value in zip(axes, values, strict=True):
        if axis.name in ("shots", "method"):
            fields[axis.name] = value
        else:
            changes.update(axis.config_changes(value))
        shown[axis.name] = show(value)
    shown["seed"] = str(seed)
    return Cell(root, (cat,), seed=seed, changes=changes, axes=shown, **fields)


def _data_roots(options: Options, cache_root: Path) -> tuple[list[str], bool]:
    if options.data:
        roots = []
        for given in options.data:
            root = Path(given).expanduser().resolve()
            if not root.is_dir():
                raise CheckError(f"--data {given}: no such folder")
            roots.append(str(root))
        return list(dict.fromkeys(roots)), False
    from fbft.data.synthetic import VERSION

    root = cache_root / "synthetic" / f"v{VERSION}-seed{SYNTHETIC['seed']}"
    print(f"no --data: the synthetic benchmark in {root} (made once per category)", flush=True)
    return [str(root)], True


def ensure_synthetic(
    root: Path, cats: list[str], params: dict[str, Any], progress: bool = True
) -> None:
    """One folder per category, made once, linked into ``root`` (only the categories asked);
    also how a worker node regenerates the driver's benchmark from its seed."""
    from fbft.data.synthetic import generate

    for cat in cats:
        link = root / cat
        if link.exists():
            continue
        part = generate(root / ".categories" / cat, categories=[cat], progress=progress, **params)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{cat}.{uuid.uuid4().hex[:6]}"
        tmp.symlink_to(part / cat, target_is_directory=True)
        tmp.replace(link)


def banner(study: Study, options: Options, plan: Plan, uri: str, cache_root: Path) -> str:
    """What this invocation will do, in a few lines a person reads before waiting."""
    from fbft.study import tracking

    base = plan.base
    weights = _weights_line(base.weights, options.weights)
    sizes = options.axes.get("image_size") or [base.image_size]
    teacher = f"{base.backbone} @ {'/'.join(str(s) for s in sizes)}px"
    if "backbone" in options.axes:  # name@size values
        teacher = " | ".join(show(v) for v in options.axes["backbone"])
    overridden = {"backbone", "image_size"} & (set(options.config_changes()) | set(options.axes))
    pairs = (("backbone", "backbone"), ("image_size", "resolution"))
    smaller = [name for key, name in pairs if key not in overridden]
    note = ""
    if plan.preset == "cpu" and smaller:
        note = f"  <- CPU preset: smaller {' and '.join(smaller)}"
    lines = [
        f"== {study.title} ==",
        f"preset      {plan.preset} ({plan.preset_reason}), {plan.gpus_per_trial:g} GPU(s) per "
        f"trial{note}",
        f"teacher     {teacher}, blocks {base.layers[0]} and {base.layers[1]}, weights {weights}",
        f"students    {base.epochs} epochs, lr {base.lr:g}, batch {base.batch_size} images, "
        f"loss {base.loss}",
        *(
            f"data        {root}{' (synthetic)' if plan.data.synthetic else ''}: {', '.join(cats)}"
            for root, cats in plan.data.categories.items()
        ),
        f"trials      {len(plan.cells) if not study.search else options.num_samples}"
        + (f", {len(plan.variants)} variants each from one fit" if len(plan.variants) > 1 else ""),
        f"cache       {checks.cache_line(cache_root, options)}",
        f"tables      {options.protocol} AUPRO protocol"
        + (f" ({options.num_thresholds} thresholds)" if options.protocol == "official" else ""),
        f"tracking    {tracking.redact(uri)}",
    ]
    return "\n".join(lines)


def _weights_line(resolved: str, given: str | None) -> str:
    """The teacher weights as the user gave them and as they were resolved."""
    if resolved.startswith("random") and given == "random":
        return "random-init (--weights random: runs are tagged teacher_weights=random)"
    if resolved.startswith("random"):
        return (
            "RANDOM-INIT teacher (no pretrained weights found: runs are tagged "
            "teacher_weights=random; pass --weights FILE)"
        )
    return resolved if given in (None, "auto", resolved) else f"{resolved} (--weights {given})"
