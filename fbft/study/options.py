"""The command line of a study, parsed once into a frozen, typed :class:`Options`.

Nothing here imports Ray, torch or MLflow, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fbft.core.config import PRESETS
from fbft.detectors.registry import BASELINE_PRESETS
from fbft.metrics.keys import official_keys, score_keys
from fbft.study.spec import Study, layer_pair

PROTOCOLS = ("official", "exact")
# Options that do not change what a study computes: they may differ on --resume.
RUNTIME_ONLY = (
    "resume",
    "verbose",
    "max_concurrent",
    "address",
    "argv",
    "cache_max_gb",
    "register",
    "tracking_uri",
    "storage",
    "max_failures",
)


@dataclass(frozen=True)
class Options:
    """Everything a study invocation was asked to do (axis values under ``axes``)."""

    axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    data: tuple[str, ...] = ()
    format: str = "auto"
    categories: tuple[str, ...] = ()
    preset: str = "auto"
    backbone: str | None = None
    backbone_kwargs: dict[str, Any] | None = None
    weights: str | None = None
    image_size: int | None = None
    layers: tuple[int, int] | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seeds: tuple[int, ...] = (0,)
    nested: bool = False
    teacher_per_epoch: bool = False
    baseline_preset: str = "paper"
    protocol: str = "official"
    num_thresholds: int = 99
    tracking_uri: str | None = None
    experiment: str | None = None
    address: str | None = None
    storage: str | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    cache_dtype: str = "float32"
    cache_max_gb: float | None = None
    target_fpr: float = 0.01
    register: str | None = None
    log_teacher: bool = False
    resume: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    max_failures: int = 3
    pictures: int = 4
    verbose: bool = False
    num_samples: int = 20
    metric: str = "aupro_5"
    asha: bool = False
    argv: tuple[str, ...] = ()

    def config_changes(self) -> dict[str, Any]:
        """FBFTConfig fields set on the command line (over the preset)."""
        names = ("backbone", "backbone_kwargs", "weights", "image_size", "layers")
        names += ("epochs", "lr", "batch_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def comparable(self) -> dict[str, Any]:
        """The options that decide a study's results, as JSON values (checked on --resume)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_ONLY}
        return json.loads(json.dumps(out))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each meaningful default once, after the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})"


def _presets_text() -> str:
    lines = ["presets (--preset; auto = paper with a GPU in the cluster, else cpu):"]
    for name, values in PRESETS.items():
        settings = ", ".join(f"{k}={v}" for k, v in values.items()) or "the paper's defaults"
        lines.append(f"  {name:6s} {settings}")
    lines.append(
        "  paper defaults: vit_base_patch14_reg4_dinov2.lvd142m @ 1036 px, blocks 8,12, "
        "50 epochs, lr 1e-4, batch 4"
    )
    return "\n".join(lines)


def build_parser(study: Study) -> argparse.ArgumentParser:
    """The common flags plus the study's own axis flags."""
    p = argparse.ArgumentParser(
        prog=study.script,
        description=study.title,
        epilog=_presets_text(),
        formatter_class=_Formatter,
    )
    for axis in study.axes:
        p.add_argument(
            axis.flag, nargs="+", type=axis.parse, default=list(axis.default), help=axis.help
        )
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[],
                   help="dataset roots; with several, tables group rows per dataset "
                   "(default: the synthetic benchmark, made once)")  # fmt: skip
    g.add_argument("--format", default="auto", choices=["auto", "mvtec", "visa", "visa_1cls"])
    g.add_argument("--categories", nargs="+", default=[], help="categories to run (default: all)")
    g = p.add_argument_group("detector (unset = the preset's value)")
    g.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    g.add_argument("--backbone", help="timm ViT name")
    g.add_argument(
        "--backbone-kwargs",
        type=json.loads,
        help="timm architecture overrides as JSON, e.g. '{\"depth\": 4}'",
    )
    g.add_argument("--weights", help="auto | hub | random | path of a checkpoint file")
    g.add_argument("--image-size", type=int, help="teacher input side (multiple of the patch)")
    g.add_argument("--layers", type=layer_pair, help="1-indexed blocks j,k (e.g. 8,12)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds: students and few-shot draws (the official code uses 115)",
    )
    g.add_argument(
        "--nested",
        action="store_true",
        help="few-shot draws nested across shot counts (5 ⊂ 10 ⊂ 50) instead of "
        "independent draws per (shots, seed)",
    )
    g.add_argument("--teacher-per-epoch", action="store_true",
                   help="train FBFT with the official loop (teacher re-run on every batch of "
                   "every epoch, no cache) to measure its training time (Table 10)")  # fmt: skip
    g.add_argument("--baseline-preset", default="paper", choices=BASELINE_PRESETS,
                   help="PatchCore/SPADE settings: paper = the published methods (3x3 "
                   "aggregation, raw features, max score, Gaussian σ=4 maps; SPADE a map per "
                   "block), fbft-maps = normalised tokens, FBFT's map blur, PatchCore's eq. 7 "
                   "score")  # fmt: skip
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--protocol",
        default="official",
        choices=PROTOCOLS,
        help="AUPRO protocol of the printed tables (both are logged)",
    )
    g.add_argument(
        "--num-thresholds",
        type=int,
        default=99,
        help="thresholds of the official (sampled) protocol",
    )
    g.add_argument("--pictures", type=int, default=4, help="test images with overlays per trial")
    g.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="false-positive rate of the calibrated image/pixel thresholds",
    )
    g = p.add_argument_group("models")
    g.add_argument(
        "--register", metavar="NAME", help="register the best trial's model under this name"
    )
    g.add_argument(
        "--log-teacher",
        action="store_true",
        help="copy the teacher weights into each logged model (default: referenced)",
    )
    g = p.add_argument_group("tracking and execution")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    g.add_argument("--experiment", help=f"MLflow experiment (default: fbft-{study.name})")
    g.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)",
    )
    g.add_argument("--storage", help="Tune storage: folder, NFS or s3:// (default: ./ray_results)")
    g.add_argument("--cache-dir", help="cache folder (default: $FBFT_CACHE_DIR or ~/.cache/fbft)")
    g.add_argument("--no-cache", action="store_true", help="run the teacher in every trial")
    g.add_argument(
        "--cache-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="how teacher tokens are stored in the cache",
    )
    g.add_argument(
        "--cache-max-gb",
        type=float,
        help="cache size limit: least recently used entries are evicted",
    )
    g.add_argument(
        "--resume", nargs="?", const="latest", help="continue a study: its name, or the latest"
    )
    g.add_argument("--cpus-per-trial", type=float, default=1.0)
    g.add_argument(
        "--gpus-per-trial",
        type=float,
        help="fractional allowed (default: 1 when the cluster has GPUs)",
    )
    g.add_argument("--max-concurrent", type=int, help="trials at a time (default: as resources)")
    g.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="retries of a trial after an infrastructure failure (a lost node or worker, "
        "Ray's memory monitor); a deterministic error fails at once",
    )
    g.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own logs")
    if study.search is not None:
        g = p.add_argument_group("search")
        g.add_argument("--num-samples", type=int, default=20, help="configurations to try")
        g.add_argument(
            "--metric", default=study.search.metric, choices=score_keys() + official_keys()
        )
        g.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA)")
    return p


def parse(study: Study, argv: Sequence[str]) -> Options:
    """Parse and check a study's command line (argparse errors exit 2 with a message)."""
    p = build_parser(study)
    ns = vars(p.parse_args(list(argv)))
    if ns["cpus_per_trial"] <= 0 or (ns["gpus_per_trial"] or 0) < 0:
        p.error("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if ns["max_failures"] < 0:
        p.error("--max-failures must be >= 0")
    if ns["num_thresholds"] < 2:
        p.error("--num-thresholds must be at least 2")
    if ns["pictures"] < 0:
        p.error("--pictures must be >= 0")
    if not 0 < ns["target_fpr"] < 1:
        p.error("--target-fpr must be between 0 and 1 (e.g. 0.01)")
    if ns["cache_max_gb"] is not None and ns["cache_max_gb"] <= 0:
        p.error("--cache-max-gb must be > 0")
    axes = {a.name: tuple(dict.fromkeys(ns.pop(a.dest))) for a in study.axes}
    known = {f.name for f in dataclasses.fields(Options)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items() if k in known}
    values["seeds"] = tuple(dict.fromkeys(values["seeds"]))
    return Options(axes=axes, argv=tuple(argv), **values)
