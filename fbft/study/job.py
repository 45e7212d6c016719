"""One category of one trial, without Ray or MLflow: data -> tokens -> one fit -> every variant.

few-shot subset -> teacher tokens (cache hit or one teacher pass per image) -> the detector fitted
once -> every inference-side variant from one pass over the test tokens -> both AUPRO protocols
(exact and the official sampled one) from one accumulator per variant -> figures.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fbft.metrics.keys import OFFICIAL_PREFIX

CALIBRATION_IMAGES = 8  # unused nominal training images that calibrate the thresholds


@dataclass(frozen=True)
class JobSettings:
    """What every job of a study shares: data format, draws, variants, cache, metrics, models."""

    format: str = "auto"
    nested: bool = False
    variants: tuple[dict[str, Any], ...] = ({},)  # inference-side settings; ({},) = the config's
    cache_dir: str | None = None
    cache_dtype: str = "float32"
    cache_max_gb: float | None = None
    num_thresholds: int = 99
    protocol: str = "official"  # the AUPRO protocol the figures show (tables: the same)
    pictures: int = 4
    target_fpr: float = 0.01
    log_teacher: bool = False
    teacher_per_epoch: bool = False
    baseline_preset: str | None = "paper"  # PatchCore/SPADE settings; None = FBFT's map settings


@dataclass(frozen=True)
class Job:
    """What to run for one category (plain values: it travels to a Ray worker)."""

    data: str
    category: str
    method: str
    config: dict[str, Any]  # FBFTConfig fields, weights resolved on the driver
    shots: int | str  # a number or "full"
    seed: int
    settings: JobSettings = JobSettings()


@dataclass
class Outcome:
    """What a job produced: metrics per variant, counters, and files to log per variant."""

    metrics: list[dict[str, float]]
    counters: dict[str, float]
    sizes: dict[str, int]
    history: list[float]
    files: list[dict[str, Path]] = field(default_factory=list)
    detector: Any = None
    thresholds: Any = None
    tags: dict[str, str] = field(default_factory=dict)


def training_subset(job: Job, train: Any) -> tuple[Any, Any]:
    """(training images, unused nominal images for calibration) of a category."""
    from fbft.data import few_shot

    n = len(train)
    if job.shots == "full":
        return train, train.subset([])
    shots = int(job.shots)
    if job.settings.nested:
        chosen = few_shot(train, shots, job.seed)
    else:  # an independent draw per (shots, seed)
        seed = int(np.random.SeedSequence([job.seed, shots]).generate_state(1)[0])
        chosen = few_shot(train, shots, seed)
    used = {s.path for s in chosen}
    rest = [i for i in range(n) if train[i].path not in used][:CALIBRATION_IMAGES]
    return chosen, train.subset(rest)


def run_job(job: Job, out: Path) -> Outcome:
    """Fit once, evaluate every variant; figures go to ``out/<variant index>/``."""
    from fbft.cache.features import FeatureCache
    from fbft.data import open_dataset
    from fbft.detectors.registry import DEFAULT_METHOD, build

    train_all = open_dataset(job.data, job.category, "train", job.settings.format)
    test = open_dataset(job.data, job.category, "test", job.settings.format)
    train, calibration = training_subset(job, train_all)
    detector, teacher = build(job.method, job.config, job.settings.baseline_preset)
    cache = None
    if job.settings.cache_dir:
        cache = FeatureCache(
            job.settings.cache_dir,
            teacher.describe(),
            dtype=job.settings.cache_dtype,
            max_gb=job.settings.cache_max_gb,
        )
    source = _TokenSource(teacher, cache, int(job.config.get("batch_size", 4)))
    if (
        job.settings.teacher_per_epoch and job.method == DEFAULT_METHOD
    ):  # the official loop, to time it
        start = time.perf_counter()
        detector.fit([s.image for s in train], teacher_per_epoch=True)
        fit_seconds = time.perf_counter() - start
    else:
        tokens = source.of(train)
        start = time.perf_counter()
        detector.fit_tokens(tokens)
        fit_seconds = time.perf_counter() - start
        del tokens  # releases the cache entries' read locks
    thresholds = _calibrate(detector, calibration, source, job)
    start = time.perf_counter()
    evaluation = _evaluate(detector, test, source, job)
    evaluate_seconds = time.perf_counter() - start
    report = source.report
    teacher_ms = float(np.mean(report.teacher_ms)) if report.teacher_ms else float("nan")
    per_image = {s: evaluation.seconds.get(s, 0.0) * 1000 / max(1, len(test))
                 for s in ("students", "knn", "maps")}  # fmt: skip
    counters = {
        "time/fit_seconds": fit_seconds,
        "time/teacher_ms": teacher_ms,
        **{f"time/{s}_ms": v for s, v in per_image.items() if s in evaluation.seconds},
        "time/inference_ms": teacher_ms + sum(per_image.values()),
        "time/evaluate_seconds": evaluate_seconds,  # teacher misses + predict + metrics
        "time/metrics_seconds": evaluation.metric_seconds,
        "cache/teacher_passes": float(report.passes),
        "cache/teacher_reused": float(report.reused),
        "student_fits": float(getattr(detector, "students", None) is not None),  # baselines: 0
    }
    outcome = Outcome(
        metrics=evaluation.metrics,
        counters=counters,
        sizes={"n_train": len(train), "n_test": len(test), "n_calibration": len(calibration)},
        history=list(getattr(detector, "history", [])),
        detector=detector,
        thresholds=thresholds,
        tags={
            "token_tier": str(getattr(detector, "token_tier", "n/a")),
            "teacher_weights": teacher.weights_source,
            "device": str(teacher.device),
            **(
                {"baseline_preset": str(job.settings.baseline_preset)}
                if job.method != DEFAULT_METHOD
                else {}
            ),
        },
    )
    if thresholds is not None:
        from fbft.serve.thresholds import decision_metrics

        for m, scores in zip(outcome.metrics, evaluation.scores, strict=True):
            found = decision_metrics(scores, evaluation.labels, thresholds)
            m.update({f"threshold/{k}": v for k, v in found.items()})
    start = time.perf_counter()
    outcome.files = _figures(job, evaluation, out)
    outcome.counters["time/figures_seconds"] = time.perf_counter() - start
    return outcome


@dataclass
class _Evaluation:
    metrics: list[dict[str, float]]
    scores: list[list[float]]
    labels: list[int]
    seconds: dict[str, float]
    curves: list[Any]
    shown: list[list[tuple[Any, np.ndarray, float]]]  # per variant: (sample, map, score)
    nominal_values: list[list[np.ndarray]]
    metric_seconds: float = 0.0


def _batches(dataset: Any, size: int) -> Any:
    for start in range(0, len(dataset), size):
        yield start, [dataset[i] for i in range(start, min(start + size, len(dataset)))]


class _TokenSource:
    """Teacher tokens of samples (cache or teacher), with the running cache report."""

    def __init__(self, teacher: Any, cache: Any, batch: int) -> None:
        from fbft.cache.features import CacheReport

        self.teacher, self.cache, self.batch = teacher, cache, batch
        self.report = CacheReport()

    def of(self, samples: Sequence[Any]) -> list[tuple[Any, Any]]:
        from fbft.cache.features import teacher_tokens

        tokens, report = teacher_tokens(list(samples), self.teacher.encode, self.cache, self.batch)
        self.report = self.report + report
        return tokens


def _calibrate(detector: Any, calibration: Any, source: _TokenSource, job: Job) -> Any:
    """Image and pixel thresholds at the target FPR from nominal images not trained on."""
    if len(calibration) == 0:
        return None
    from fbft.serve.thresholds import calibrate

    scores, values = [], []
    sizes = calibration.sizes()
    for start, chunk in _batches(calibration, source.batch):
        tokens = source.of(chunk)
        (pred,) = detector.predict_variants(tokens, sizes[start : start + len(chunk)], ({},))
        scores += pred.scores
        values += pred.maps
    return calibrate(scores, values, job.settings.target_fpr)


def _evaluate(detector: Any, test: Any, source: _TokenSource, job: Job) -> _Evaluation:
    """Every variant's maps of the whole test set, streamed into one accumulator per variant."""
    from fbft.metrics import MetricAccumulator

    sizes = test.sizes()  # file headers only, read once
    pixels = sum(h * w for h, w in sizes)
    accs = [MetricAccumulator(None, pixels=pixels) for _ in job.settings.variants]
    anomalous = [i for i, s in enumerate(test) if s.label]
    nominal = [i for i, s in enumerate(test) if not s.label]
    picked = set(
        _spread(anomalous, job.settings.pictures - 1) + nominal[: min(1, job.settings.pictures)]
    )
    ev = _Evaluation(
        [],
        [[] for _ in job.settings.variants],
        [],
        {},
        [],
        [[] for _ in job.settings.variants],
        [[] for _ in job.settings.variants],
    )
    for start, chunk in _batches(test, source.batch):
        tokens = source.of(chunk)
        preds = detector.predict_variants(
            tokens, sizes[start : start + len(chunk)], job.settings.variants
        )
        masks = [s.mask for s in chunk]
        ev.labels += [int(s.label) for s in chunk]
        for v, pred in enumerate(preds):
            for stage, s in pred.seconds.items():
                ev.seconds[stage] = ev.seconds.get(stage, 0.0) + s / len(preds)
            for offset, (sample, amap, score) in enumerate(
                zip(chunk, pred.maps, pred.scores, strict=True)
            ):
                accs[v].update(amap, masks[offset], sample.label, score)
                ev.scores[v].append(float(score))
                if not sample.label:
                    ev.nominal_values[v].append(amap.ravel()[::37].copy())
                if start + offset in picked:
                    ev.shown[v].append((sample, amap, float(score)))
    start = time.perf_counter()
    for acc in accs:
        official, exact = _both_protocols(acc, job.settings)
        metrics = dict(exact)
        metrics.update(
            {
                OFFICIAL_PREFIX + k: v
                for k, v in official.items()
                if k.startswith(("aupro_", "rho_"))
            }
        )
        ev.metrics.append(metrics)
        ev.curves.append(acc.curves)
    ev.metric_seconds = time.perf_counter() - start  # the accumulators' updates are not in it
    return ev


def _both_protocols(acc: Any, settings: JobSettings) -> tuple[dict, dict]:
    """(official, exact) metrics; the figures' protocol is computed last, so ``acc.curves``
    are the curves of the protocol the tables use."""
    if settings.protocol == "official":
        exact = acc.compute(None)
        return acc.compute(settings.num_thresholds), exact
    official = acc.compute(settings.num_thresholds)
    return official, acc.compute(None)


def in_protocol(metrics: Mapping[str, float], protocol: str) -> dict[str, float]:
    """A trial's metrics with the AUPRO/ρ keys of ``protocol`` under their plain names."""
    if protocol != "official":
        return dict(metrics)
    chosen = {
        k[len(OFFICIAL_PREFIX) :]: v for k, v in metrics.items() if k.startswith(OFFICIAL_PREFIX)
    }
    return {**metrics, **chosen}


def _figures(job: Job, ev: _Evaluation, out: Path) -> list[dict[str, Path]]:
    """Per variant: overlays on one colour scale, PRO curves, quartile chart."""
    from fbft import plots

    files = []
    for v, metrics in enumerate(ev.metrics):
        folder = out / str(v)
        values = np.concatenate(ev.nominal_values[v]) if ev.nominal_values[v] else None
        vmin, vmax = plots.color_range(values) if values is not None else (None, None)
        mine: dict[str, Path] = {}
        for sample, amap, score in ev.shown[v]:
            stem = Path(sample.path).stem
            name = f"{job.category}_{sample.defect_type}_{stem}.png"
            title = f"{job.category} · {sample.defect_type} · {stem} · score {score:.4f}"
            mine[f"maps/{name}"] = plots.overlay(
                sample.image, sample.mask, amap, folder / name, title, vmin=vmin, vmax=vmax
            )
        protocol = job.settings.protocol
        shown = in_protocol(metrics, protocol)
        title = f"{job.category} · {protocol} protocol"
        mine["pro_curve.png"] = plots.pro_curves(
            ev.curves[v], folder / "pro_curve.png", title=title, metrics=shown
        )
        mine["quartiles.png"] = plots.quartile_chart(shown, folder / "quartiles.png", title=title)
        files.append(mine)
    return files


def _spread(items: list[int], n: int) -> list[int]:
    if n <= 0 or not items:
        return []
    picks = np.linspace(0, len(items) - 1, num=min(n, len(items))).round().astype(int)
    return [items[i] for i in sorted(set(picks))]


def variant_label(variant: Mapping[str, Any]) -> str:
    """``{"fusion": "sum"}`` -> ``fusion=sum`` ("" for the config's own setting)."""
    return " ".join(f"{k}={v}" for k, v in variant.items())
