"""The Ray Tune runner behind every ``studies/*.py``.

A study declares the settings it varies (:class:`Axis`) or a search space (:class:`Search`);
this module turns the command line into trials, runs them on a local or remote Ray cluster,
logs each trial as an MLflow child run under one parent run per invocation, and prints a table
laid out like the paper's. One trial = one configuration on its categories:
few-shot subset -> teacher tokens (feature cache) -> students -> maps -> metrics -> report.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from fbft import plots, tracking
from fbft.config import PRESETS, FBFTConfig
from fbft.features import CacheStats, FeatureCache, default_cache_dir, teacher_tokens
from fbft.metrics import MetricAccumulator, metric_keys

HEADLINE = {
    "i_auroc": "I-AUROC",
    "aupro_30": "AUPRO@30%",
    "aupro_5": "AUPRO@5%",
    "aupro_5_q1": "Q1 AUPRO@5%",
    "rho_5": "ρ@5%",
}
TIMINGS = ("fit_seconds", "teacher_ms", "students_ms", "maps_ms")
STATE_FILE = "fbft_study.json"
SYNTHETIC = {"image_size": 1024, "n_train": 60, "n_test": 24, "seed": 0}


# --------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Axis:
    """A varied setting: trial-config key (FBFTConfig field or ``shots``), flag and defaults."""

    name: str
    flag: str
    default: tuple[Any, ...]
    help: str
    parse: Callable[[str], Any] = str


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


def layer_pair(text: str) -> str:
    """``"8,12"`` / ``"8-12"`` -> ``"8,12"`` (1-indexed blocks j < k)."""
    parts = text.replace("-", ",").replace(" ", ",").split(",")
    try:
        j, k = (int(p) for p in parts if p)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layer pair {text!r}: write two block numbers like 8,12"
        ) from None
    return f"{j},{k}"


# --------------------------------------------------------------------------- command line
def parse_args(study: Study, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common flags plus the study's own axis flags."""
    p = argparse.ArgumentParser(
        prog=f"studies/{study.name.replace('-', '_')}.py",
        description=study.title,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for axis in study.axes:
        p.add_argument(
            axis.flag, nargs="+", type=axis.parse, default=list(axis.default), help=axis.help
        )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset root (default: the synthetic benchmark, generated once)")
    g.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa", "visa_1cls"])
    g.add_argument("--categories", nargs="+", help="categories to run (default: all)")
    g = p.add_argument_group("detector")
    g.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    g.add_argument("--backbone", help="timm ViT name")
    g.add_argument(
        "--backbone-kwargs",
        type=json.loads,
        help='timm architecture overrides as JSON, e.g. \'{"depth": 4, "embed_dim": 64}\'',
    )
    g.add_argument("--weights", help="auto | hub | random | path of a checkpoint file")
    g.add_argument("--image-size", type=int, help="teacher input side (multiple of the patch)")
    g.add_argument("--layers", type=layer_pair, help="1-indexed blocks j,k (e.g. 8,12)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="student/few-shot seeds")
    g.add_argument(
        "--num-thresholds",
        type=int,
        help="AUPRO protocol: exact by default; 99 = the official L2BT sampling",
    )
    g = p.add_argument_group("tracking and execution")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    g.add_argument("--experiment", help=f"MLflow experiment (default: fbft-{study.name})")
    g.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address")
    g.add_argument("--storage", help="Tune storage path: folder, NFS or s3:// (./ray_results)")
    g.add_argument("--cache-dir", help=f"teacher-feature cache (default: {default_cache_dir()})")
    g.add_argument("--no-cache", action="store_true", help="run the teacher in every trial")
    g.add_argument(
        "--resume", nargs="?", const="latest", help="continue a study: its name, or the latest"
    )
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument("--gpus-per-trial", type=float, help="fractional allowed (default: 1 if GPUs)")
    g.add_argument("--max-concurrent", type=int, help="trials at a time (default: as resources)")
    g.add_argument("--pictures", type=int, default=4, help="test images with overlays per trial")
    if study.search is not None:
        g = p.add_argument_group("search")
        g.add_argument("--num-samples", type=int, default=20, help="configurations to try")
        g.add_argument("--metric", default=study.search.metric, choices=metric_keys())
        g.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA)")
    args = p.parse_args(argv)
    if args.cpus_per_trial <= 0 or (args.gpus_per_trial or 0) < 0:
        p.error("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    return args


# --------------------------------------------------------------------------- trial
@dataclass(frozen=True)
class Context:
    """Everything a trial needs besides its own config (the same for every trial)."""

    data: str
    format: str
    synthetic: bool
    base_config: dict[str, Any]
    tracking_uri: str
    parent_run_id: str
    cache_dir: str | None
    num_thresholds: int | None
    pictures: int
    cpus_per_trial: float
    tags: dict[str, str]


def run_trial(config: dict[str, Any], context: Context) -> None:
    """Tune trainable: evaluate one configuration on its categories, log it, report it."""
    import torch
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    client = MlflowClient(context.tracking_uri)
    trial_id = tune.get_context().get_trial_id() or "local"
    varied = {k: v for k, v in config.items() if k != "categories"}
    name = " ".join(f"{k}={v}" for k, v in varied.items())
    cats = list(config["categories"])
    tags = {**context.tags, "categories": ",".join(cats), **{k: str(v) for k, v in varied.items()}}
    if len(cats) == 1:
        tags["category"] = cats[0]
    run_id, finished = tracking.child_run(client, context.parent_run_id, trial_id, name, tags)
    if finished:  # an earlier attempt logged everything: report it again, don't recompute
        tune.report(tracking.finished_metrics(client, run_id))
        return
    client.update_run(run_id, status="RUNNING")
    config_params = trial_config(context.base_config, config).to_dict()
    tracking.log_params(client, run_id, {f"config.{k}": v for k, v in config_params.items()})
    client.set_tag(run_id, "host", socket.gethostname())
    client.set_tag(run_id, "ray_node_id", ray.get_runtime_context().get_node_id())
    done = 0
    try:
        totals: dict[str, list[float]] = {}
        for done, category in enumerate(cats, start=1):
            metrics = _run_category(category, config, context, client, run_id, len(cats) > 1)
            for key, value in metrics.items():
                totals.setdefault(key, []).append(value)
            means = {k: float(np.mean(v)) for k, v in totals.items()}
            tracking.log_metrics(client, run_id, means, step=done)
            tune.report({**means, "categories_done": done})
    except SystemExit:  # Tune ends the trial from tune.report: a scheduler stopped it
        if done < len(cats):
            client.set_tag(run_id, "stopped_early", f"after {done} of {len(cats)} categories")
        client.set_terminated(run_id, "FINISHED" if done == len(cats) else "KILLED")
        raise
    except BaseException as err:
        client.set_tag(run_id, "error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _run_category(
    category: str,
    config: dict[str, Any],
    context: Context,
    client: Any,
    run_id: str,
    prefixed: bool,
) -> dict[str, float]:
    from fbft import FBFT
    from fbft.data import few_shot, open_dataset

    if context.synthetic:
        _ensure_synthetic(Path(context.data))
    train = open_dataset(context.data, category, "train", context.format)
    if config.get("shots"):
        train = few_shot(train, int(config["shots"]), int(config.get("seed", 0)))
    test = open_dataset(context.data, category, "test", context.format)
    cfg = trial_config(context.base_config, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = FBFT(cfg)
    if not prefixed:
        sizes = {"category": category, "n_train": len(train), "n_test": len(test)}
        tracking.log_params(client, run_id, sizes)
    client.set_tag(run_id, "teacher_weights", model.teacher_weights)
    client.set_tag(run_id, "device", str(model.device))
    if caught:
        client.set_tag(run_id, "warnings", " | ".join(str(w.message) for w in caught)[:5000])
    cache = FeatureCache(context.cache_dir, model) if context.cache_dir else None
    stats = CacheStats()
    tokens = teacher_tokens(model, [s.path for s in train], lambda i: train[i].image, cache, stats)
    model.fit_tokens(tokens)
    del tokens
    fit_seconds = model.timings["fit_seconds"]

    with tempfile.TemporaryDirectory(prefix=f"fbft-{category}-") as tmp:
        metrics = _evaluate(model, test, category, context, cache, stats, Path(tmp))
        metrics.update(
            fit_seconds=fit_seconds,
            teacher_ms=float(np.mean(stats.teacher_ms)) if stats.teacher_ms else float("nan"),
            teacher_passes=float(stats.passes),
            teacher_reused=float(stats.reused),
            final_loss=model.history[-1],
        )
        plots.quartile_chart(metrics, Path(tmp) / "quartiles.png")
        model.save(Path(tmp) / "students.pt")
        client.log_artifacts(run_id, tmp, category if prefixed else None)
    if prefixed:
        tracking.log_metrics(client, run_id, {f"{category}/{k}": v for k, v in metrics.items()})
    return metrics


def _evaluate(
    model: Any,
    test: Any,
    category: str,
    context: Context,
    cache: FeatureCache | None,
    stats: CacheStats,
    out: Path,
) -> dict[str, float]:
    """Maps of the whole test set, streamed into the metrics; overlays and PRO curves to ``out``."""
    sizes = test.sizes()  # file headers only, read once
    acc = MetricAccumulator(context.num_thresholds, pixels=sum(h * w for h, w in sizes))
    anomalous = [i for i, s in enumerate(test) if s.label]
    nominal = [i for i, s in enumerate(test) if not s.label]
    shown = set(_spread(anomalous, context.pictures - 1) + nominal[: min(1, context.pictures)])
    stage_ms = {"students": 0.0, "maps": 0.0}
    step = max(1, model.config.batch_size)
    for start in range(0, len(test), step):
        chunk = [test[i] for i in range(start, min(start + step, len(test)))]
        toks = teacher_tokens(
            model, [s.path for s in chunk], lambda i, c=chunk: c[i].image, cache, stats
        )
        maps_, scores = model.predict_tokens(toks, sizes[start : start + len(chunk)])
        for stage in stage_ms:
            stage_ms[stage] += model.timings[f"{stage}_ms"] * len(chunk)
        for offset, (sample, amap, score) in enumerate(zip(chunk, maps_, scores, strict=True)):
            mask = sample.mask
            acc.update(amap, mask, sample.label, score)
            if start + offset in shown:
                title = f"{category} · {sample.defect_type} · score {score:.4f}"
                plots.overlay(
                    sample.image, mask, amap, out / f"map_{start + offset:04d}.png", title
                )
    metrics = acc.compute()
    plots.pro_curves(acc.curves, out / "pro_curve.png")
    metrics["students_ms"] = stage_ms["students"] / max(1, len(test))
    metrics["maps_ms"] = stage_ms["maps"] / max(1, len(test))
    return metrics


def trial_config(base: dict[str, Any], config: dict[str, Any]) -> FBFTConfig:
    """The detector settings of a trial: the study's base settings, then the trial's own."""
    fields = set(FBFTConfig.__dataclass_fields__)
    changes = {k: v for k, v in config.items() if k in fields}
    if isinstance(changes.get("layers"), str):
        changes["layers"] = tuple(int(b) for b in changes["layers"].split(","))
    return FBFTConfig.from_dict({**base, **changes, "progress": False})


def _spread(items: list[int], n: int) -> list[int]:
    if n <= 0 or not items:
        return []
    picks = np.linspace(0, len(items) - 1, num=min(n, len(items))).round().astype(int)
    return [items[i] for i in sorted(set(picks))]


def _ensure_synthetic(root: Path) -> Path:
    from fbft.data.synthetic import generate

    return generate(root, **SYNTHETIC)


# --------------------------------------------------------------------------- driver
def main(study: Study, argv: Sequence[str] | None = None) -> int:
    """Run a study from the command line; returns the process exit code."""
    args = parse_args(study, argv)
    try:
        return run(study, args, argv if argv is not None else sys.argv[1:])
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class StudyError(Exception):
    """A problem with the study's inputs, reported without a traceback."""


def run(study: Study, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run a parsed study invocation; returns the process exit code."""

    started = time.time()
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    cache_root = (
        Path(args.cache_dir).expanduser().resolve() if args.cache_dir else default_cache_dir()
    )
    _check_tracking(tracking_uri)
    data, synthetic = _data_root(args, cache_root)
    cats = _categories(data, args)
    if not ray.is_initialized():
        try:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError) as err:
            raise StudyError(
                f"cannot connect to the Ray cluster at {args.address}: {err}"
            ) from None
    gpus = float(ray.cluster_resources().get("GPU", 0))
    preset, reason = _preset(args.preset, gpus)
    base = _base_config(preset, args)
    banner = _banner(study, args, preset, reason, base, data, synthetic, cats, tracking_uri)
    print(banner, flush=True)
    depth = _check_inputs(study, args, base, data, cats)

    storage = _storage(args.storage)
    name, state = _experiment(study, args, storage)
    script = f"studies/{study.name.replace('-', '_')}.py"
    experiment = args.experiment or f"fbft-{study.name}"
    if state is None:
        tags = {"preset": preset, "preset_reason": reason, "study": study.name, "fbft.data": data}
        params = {"command": shlex.join(["python", script, *argv])}
        params.update(
            {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in vars(args).items()}
        )
        parent = tracking.start_parent_run(tracking_uri, experiment, name, params, tags)
        state = {"parent_run_id": parent, "tracking_uri": tracking_uri, "name": name}
        _write_state(storage, name, state)
    context = Context(
        data=data,
        format=args.format,
        synthetic=synthetic,
        base_config=base.to_dict(),
        tracking_uri=state["tracking_uri"],
        parent_run_id=state["parent_run_id"],
        cache_dir=None if args.no_cache else str(cache_root / "features"),
        num_thresholds=args.num_thresholds,
        pictures=args.pictures,
        cpus_per_trial=args.cpus_per_trial,
        tags={"preset": preset, "study": study.name},
    )
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else min(1.0, gpus)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": args.cpus_per_trial, "gpu": gpus_per_trial},
    )
    path = f"{storage}/{name}"
    progress = Progress(total=_trial_count(study, args, cats))
    if args.resume and tune.Tuner.can_restore(path):
        print(f"resuming {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = _new_tuner(study, args, cats, trainable, storage, name, progress, depth)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    resume_cmd = shlex.join(["python", script, *_without_resume(argv), "--resume", name])
    finished = 0 if grid is None else grid.num_terminated + grid.num_errors
    if finished < progress.total:
        print(
            f"\ninterrupted after {finished} of {progress.total} trials: the study is saved in "
            f"{path}\nresume with: {resume_cmd}",
            flush=True,
        )
        return 130
    return _summarise(study, args, grid, state, path, started, resume_cmd)


def _data_root(args: argparse.Namespace, cache_root: Path) -> tuple[str, bool]:
    if args.data:
        root = Path(args.data).expanduser().resolve()
        if not root.is_dir():
            raise StudyError(f"--data {args.data}: no such folder")
        return str(root), False
    from fbft.data.synthetic import VERSION

    root = cache_root / "synthetic" / f"v{VERSION}-seed{SYNTHETIC['seed']}"
    print(f"no --data: using the synthetic benchmark in {root} (generated once)", flush=True)
    return str(_ensure_synthetic(root)), True


def _check_tracking(uri: str) -> None:
    """A tracking server must answer before anything starts (MLflow retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answers (a proxy may guard /health); credentials are MLflow's business
    except OSError as err:
        raise StudyError(
            f"--tracking-uri {uri}: the MLflow server does not answer ({err})"
        ) from None


def _categories(data: str, args: argparse.Namespace) -> list[str]:
    from fbft.data import DatasetError, categories

    try:
        known = categories(data, args.format)
    except DatasetError as err:
        raise StudyError(str(err)) from None
    if not args.categories:
        return known
    unknown = sorted(set(args.categories) - set(known))
    if unknown:
        raise StudyError(f"unknown categories {unknown} in {data}; known: {', '.join(known)}")
    return list(args.categories)


def _preset(requested: str, gpus: float) -> tuple[str, str]:
    if requested != "auto":
        return requested, f"--preset {requested}"
    if gpus > 0:
        return "paper", f"{gpus:g} GPU(s) in the Ray cluster"
    return "cpu", "no GPU in the Ray cluster"


def _base_config(preset: str, args: argparse.Namespace) -> FBFTConfig:
    changes = {
        "backbone": args.backbone,
        "backbone_kwargs": args.backbone_kwargs,
        "weights": args.weights,
        "image_size": args.image_size,
        "layers": tuple(int(b) for b in args.layers.split(",")) if args.layers else None,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
    }
    try:
        return FBFTConfig(
            **{**PRESETS[preset], **{k: v for k, v in changes.items() if v is not None}}
        )
    except (ValueError, TypeError) as err:
        raise StudyError(str(err)) from None


def _banner(
    study: Study,
    args: argparse.Namespace,
    preset: str,
    reason: str,
    base: FBFTConfig,
    data: str,
    synthetic: bool,
    cats: list[str],
    tracking_uri: str,
) -> str:
    """What this invocation will do, in a few lines a person reads before waiting."""
    from fbft.teacher import cached_hub_file, hub_reachable

    weights = base.weights
    if weights == "auto":
        if cached_hub_file(base.backbone) is not None:
            weights = "auto (found in the local Hugging Face cache)"
        elif hub_reachable():
            weights = "auto (downloading from the Hugging Face hub)"
        else:
            weights = (
                "auto -> RANDOM-INIT teacher: the hub is unreachable and the weights are not "
                "cached (runs are tagged teacher_weights=random; pass --weights FILE)"
            )
    lines = [
        f"== {study.title} ==",
        f"preset      {preset} ({reason})"
        + ("  <- CPU preset: smaller backbone and resolution" if preset == "cpu" else ""),
        f"teacher     {base.backbone} @ {base.image_size}px, blocks {base.layers[0]} and "
        f"{base.layers[1]}, weights {weights}",
        f"students    {base.epochs} epochs, lr {base.lr:g}, batch {base.batch_size} images, "
        f"loss {base.loss}",
        f"data        {data}{' (synthetic)' if synthetic else ''}: {', '.join(cats)}",
        f"tracking    {tracking_uri}",
    ]
    return "\n".join(lines)


def _check_inputs(
    study: Study, args: argparse.Namespace, base: FBFTConfig, data: str, cats: list[str]
) -> int:
    """Fail before any trial starts: layers, sizes, weights, shots. Returns the backbone depth."""
    import timm
    import torch

    from fbft.data import DatasetError, open_dataset
    from fbft.teacher import check_image_size, check_layers

    axes = {a.name: getattr(args, a.flag.lstrip("-").replace("-", "_")) for a in study.axes}
    try:
        with torch.device("meta"):
            vit = timm.create_model(
                base.backbone, pretrained=False, num_classes=0, **base.backbone_kwargs
            )
        patch, depth = int(vit.patch_embed.patch_size[0]), len(vit.blocks)
        for size in axes.get("image_size", [base.image_size]):
            check_image_size(int(size), patch, base.backbone)
        for pair in axes.get("layers", [f"{base.layers[0]},{base.layers[1]}"]):
            j, k = (int(b) for b in str(pair).split(","))
            check_layers((j, k), depth, base.backbone)
        for key in ("loss", "distance", "fusion"):
            for value in axes.get(key, []):
                base.replace(**{key: value})
    except (ValueError, RuntimeError) as err:
        raise StudyError(str(err)) from None
    if base.weights not in ("auto", "hub", "random") and not Path(base.weights).is_file():
        raise StudyError(f"--weights {base.weights}: no such file")
    most = max(axes.get("shots", [0]) or [0])
    for cat in cats:
        try:
            available = len(open_dataset(data, cat, "train", args.format))
        except DatasetError as err:
            raise StudyError(str(err)) from None
        if most > available:
            raise StudyError(
                f"--shots {most}: category {cat!r} has only {available} training images"
            )
    return depth


def _storage(requested: str | None) -> str:
    if requested and "://" in requested:
        return requested.rstrip("/")
    return str(Path(requested or "ray_results").expanduser().resolve())


def _experiment(study: Study, args: argparse.Namespace, storage: str) -> tuple[str, dict | None]:
    """The Tune experiment name and, when resuming, its saved study state."""
    if not args.resume:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{study.name}-{stamp}", None
    if "://" in storage:
        if args.resume == "latest":
            raise StudyError("with a remote --storage, name the study to resume: --resume NAME")
        name = args.resume
    else:
        name = args.resume
        if name == "latest":
            found = sorted(Path(storage).glob(f"{study.name}-*/{STATE_FILE}"))
            if not found:
                raise StudyError(f"no {study.name} study to resume in {storage}")
            name = found[-1].parent.name
    state = _read_state(storage, name)
    if state is None:
        raise StudyError(
            f"no study named {name!r} in {storage} (look for folders with {STATE_FILE})"
        )
    return name, state


def _write_state(storage: str, name: str, state: dict) -> None:
    import pyarrow.fs

    fs, root = (
        pyarrow.fs.FileSystem.from_uri(storage)
        if "://" in storage
        else (pyarrow.fs.LocalFileSystem(), storage)
    )
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{STATE_FILE}") as f:
        f.write(json.dumps(state, indent=2).encode())


def _read_state(storage: str, name: str) -> dict | None:
    import pyarrow.fs

    fs, root = (
        pyarrow.fs.FileSystem.from_uri(storage)
        if "://" in storage
        else (pyarrow.fs.LocalFileSystem(), storage)
    )
    try:
        with fs.open_input_stream(f"{root}/{name}/{STATE_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def _trial_count(study: Study, args: argparse.Namespace, cats: list[str]) -> int:
    if study.search is not None:
        return args.num_samples
    n = len(cats) * len(args.seeds)
    for axis in study.axes:
        n *= len(getattr(args, axis.flag.lstrip("-").replace("-", "_")))
    return n


def _new_tuner(study, args, cats, trainable, storage, name, progress, depth):
    from ray import tune

    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=1),
        callbacks=[progress],
        verbose=0,
    )
    if study.search is not None:
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        space = {**study.search.space(depth), "categories": cats, "seed": args.seeds[0]}
        tune_config = tune.TuneConfig(
            metric=args.metric,
            mode="max",
            num_samples=args.num_samples,
            search_alg=OptunaSearch(seed=args.seeds[0]),
            scheduler=ASHAScheduler(time_attr="categories_done", max_t=len(cats), grace_period=1)
            if args.asha
            else None,
            max_concurrent_trials=args.max_concurrent,
        )
        return tune.Tuner(
            trainable, param_space=space, tune_config=tune_config, run_config=run_config
        )
    space: dict[str, Any] = {"categories": tune.grid_search([[c] for c in cats])}
    for axis in study.axes:
        values = getattr(args, axis.flag.lstrip("-").replace("-", "_"))
        space[axis.name] = tune.grid_search(list(dict.fromkeys(values)))
    space["seed"] = tune.grid_search(list(dict.fromkeys(args.seeds)))
    tune_config = tune.TuneConfig(max_concurrent_trials=args.max_concurrent)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _without_resume(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            if not token.startswith("-"):
                continue
        if token == "--resume":
            skip = True
            continue
        if token.startswith("--resume="):
            continue
        out.append(token)
    return out


class Progress(tune.Callback):
    """Prints one line per finished or failed trial: counts, elapsed time, ETA."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.time()
        self.finished_here = 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "FAILED")

    def _line(self, trials, trial, what: str) -> None:
        self.finished_here += 1
        status = [t.status for t in trials if t is not trial]  # this one is not updated yet
        failed = status.count("ERROR") + (what == "FAILED")
        finished = status.count("TERMINATED") + failed + (what == "done")
        elapsed = time.time() - self.start
        left = max(0, self.total - finished)
        eta = _duration(elapsed / self.finished_here * left)
        varied = " ".join(f"{k}={v}" for k, v in trial.config.items() if k != "categories")
        where = ",".join(trial.config.get("categories", []))
        print(
            f"[fbft] {finished}/{self.total} finished ({failed} failed, "
            f"{status.count('RUNNING')} running) · {_duration(elapsed)} elapsed · ETA {eta} · "
            f"{what}: {where} {varied}",
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# --------------------------------------------------------------------------- summary
def _summarise(study, args, grid, state, path, started, resume_cmd) -> int:
    from mlflow.tracking import MlflowClient

    rows, failures = [], []
    for result in grid:
        config = {k: v for k, v in (result.config or {}).items()}
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error  # unwrap RayTaskError
            failures.append((config, f"{type(cause).__name__}: {cause}".splitlines()[0][:300]))
            continue
        rows.append({**config, **(result.metrics or {})})
    keys = [a.name for a in study.axes] if study.search is None else []
    table = _table(study, rows, keys, args)
    wall = time.time() - started
    client = MlflowClient(state["tracking_uri"])
    parent = state["parent_run_id"]
    with contextlib.ExitStack() as stack:
        if "://" in path:  # remote storage: the summary goes to MLflow only
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fbft-summary-")))
        else:
            out = Path(path) / "summary"
            out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(f"# {study.title}\n\n{table}\n")
        _write_csv(out / "trials.csv", rows)
        if study.search is None and rows:
            means = _means(rows, keys, list(study.columns))
            if len(means) > 1:
                setting = keys[0] if len(keys) == 1 else "setting"
                for m in means:
                    m["setting"] = " ".join(str(m[k]) for k in keys)
                plots.summary(means, setting, study.columns, out / "summary.png")
        client.log_artifacts(parent, str(out))
    counts = {"wall_seconds": wall, "trials_done": len(rows), "trials_failed": len(failures)}
    tracking.log_metrics(client, parent, counts)
    client.set_terminated(parent, "FAILED" if failures and not rows else "FINISHED")
    print(f"\n{study.title}\n\n{table}")
    if failures:
        print(f"\n{len(failures)} trial(s) failed:")
        for config, error in failures:
            print(f"  {config}: {error}")
        print(f"re-run the failed trials with: {resume_cmd}")
    where = path if "://" in path else f"{path} (table: {path}/summary/summary.md)"
    print(f"\nwall time {_duration(wall)} · results in {where}")
    experiment = args.experiment or f"fbft-{study.name}"
    print(f"MLflow: {tracking.ui_command(state['tracking_uri'])}")
    print(f"        experiment '{experiment}', parent run '{state['name']}'")
    return 1 if failures else 0


def _means(rows: list[dict], keys: list[str], columns: list[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in keys), []).append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: [_sort_key(v) for v in kv[0]]):
        mean = {k: v for k, v in zip(keys, key, strict=True)}
        for col in columns:
            values = [m[col] for m in members if col in m and not math.isnan(m[col])]
            mean[col] = float(np.mean(values)) if values else float("nan")
        mean["n"] = len(members)
        out.append(mean)
    return out


def _sort_key(value: str) -> tuple:
    try:
        return (0, float(value.split(",")[0]), value)
    except ValueError:
        return (1, 0.0, value)


def _table(study: Study, rows: list[dict], keys: list[str], args: argparse.Namespace) -> str:
    if not rows:
        return "(no finished trial)"
    if study.search is not None:
        ranked = sorted(rows, key=lambda r: -r.get(args.metric, -1))[:10]
        params = [k for k in ranked[0] if k in FBFTConfig.__dataclass_fields__ and k != "seed"]
        head = ["rank", *params, *study.columns.values()]
        body = [
            [str(i), *(_param(r[p]) for p in params), *(_fmt(r.get(c)) for c in study.columns)]
            for i, r in enumerate(ranked, 1)
        ]
    else:
        means = _means(rows, keys, list(study.columns))
        head = [*keys, *study.columns.values(), "trials"]
        body = [
            [str(m[k]) for k in keys] + [_fmt(m[c]) for c in study.columns] + [str(m["n"])]
            for m in means
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = "means over categories and seeds" if study.search is None else f"best by {args.metric}"
    return "\n".join(lines) + f"\n\n({note}; host {socket.gethostname()})"


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _fmt(value: Any) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = sorted(
        {k for r in rows for k in r if not isinstance(r[k], dict | list) or k == "categories"}
    )
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ",".join(v) if isinstance(v, list) else v for k, v in row.items()})
