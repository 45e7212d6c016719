"""FBFT: fit the two students on a frozen teacher's tokens, predict full-resolution anomaly maps.

The teacher runs once per image: ``fit`` streams every training image's tokens into a bounded
:class:`~fbft.core.tokens.TokenStore`, then trains both students jointly on it for all epochs.
Prediction streams in batches; the students run once per batch whatever the number of
inference-side variants (fusion, distance, blur) asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fbft.core import maps
from fbft.core.config import FBFTConfig
from fbft.core.device import chunks, flushed_denormals, resolve_device, sync
from fbft.core.students import Students, load_official_students, transfer_loss
from fbft.core.teacher import Teacher, TeacherBatch, make_teacher
from fbft.core.tokens import Tier, TokenStore, release_free_memory
from fbft.detectors.base import INFERENCE_FIELDS, BaseDetector, Prediction, TokenPair, Variant
from fbft.detectors.registry import register_detector
from fbft.detectors.saved import SavedDetector

# Teacher settings a shared teacher must have to serve a config.
TEACHER_FIELDS = ("backbone", "backbone_kwargs", "image_size", "layers", "precision", "normalize")


@register_detector("fbft")
class FBFT(BaseDetector):
    """Forward–Backward Feature Transfer anomaly detector.

    >>> model = FBFT(FBFTConfig(...)).fit(train_images)
    >>> maps, scores = model.predict(test_images)

    A ``teacher`` built elsewhere may be shared (it must match the config's teacher settings).
    Entry points: ``fit`` (images) / ``fit_tokens``; ``predict`` / ``predict_detailed`` (images)
    and ``predict_variants`` (tokens); ``save`` / ``load`` (:class:`BaseDetector`).
    """

    teacher: Teacher

    def __init__(self, config: FBFTConfig | None = None, teacher: Teacher | None = None) -> None:
        self.config = config or FBFTConfig()
        self.device = resolve_device(self.config.device)
        if self.config.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(
                f"precision={self.config.precision!r} (autocast) needs a CUDA device; "
                f"this detector runs on {self.device}. Use precision='fp32'."
            )
        if teacher is not None:
            _check_teacher(teacher, self.config)
        self.teacher = (teacher or make_teacher(self.config)).to(self.device)
        self.students: Students | None = None
        self.history: list[float] = []
        self.token_tier: Tier | None = None

    @classmethod
    def from_fbft_config(
        cls, config: FBFTConfig, teacher: Teacher, preset: str | None = None
    ) -> FBFT:
        """The detector a study trial builds from its config and shared teacher (``preset``
        names a baseline preset: it does not apply to FBFT)."""
        return cls(config, teacher=teacher)

    @property
    def batch_size(self) -> int:  # type: ignore[override]
        return self.config.batch_size

    @property
    def fitted(self) -> bool:
        return self.students is not None

    @property
    def teacher_weights(self) -> str:
        """Where the teacher weights came from: hub, hub-cache, file or random."""
        return self.teacher.weights_source

    # -------------------------------------------------------------------- train
    def fit(self, images: Iterable[np.ndarray], teacher_per_epoch: bool = False) -> FBFT:
        """Train both students on nominal images (each goes through the teacher once, its
        tokens streamed into a bounded store). ``teacher_per_epoch=True`` is the official
        training loop, kept to measure its cost (the paper's Table 10): the teacher runs again
        on every batch of every epoch; batches, their order and the arithmetic are the same."""
        if teacher_per_epoch:
            return self._train(_TeacherEveryBatch(self.teacher, list(images)))
        with TokenStore(self.device, self.config.max_token_gb) as store:
            for _, f_j, f_k, _ in self.teacher.batches(images, self.config.batch_size):
                for a, b in zip(f_j, f_k, strict=True):
                    store.add(a, b)
            return self._train(store)

    def fit_tokens(self, tokens: Sequence[TokenPair]) -> FBFT:
        """Train both students on precomputed teacher tokens, one (f_j, f_k) pair per image
        (memory-mapped pairs are read from their files, not copied)."""
        for f_j, f_k in tokens:
            _check_pair(f_j, f_k, self.teacher.embed_dim)
        with TokenStore.of(tokens, self.device, self.config.max_token_gb) as store:
            return self._train(store)

    def _train(self, store: TokenStore | _TeacherEveryBatch) -> FBFT:
        cfg = self.config
        if len(store) == 0:
            raise ValueError("fit needs at least one nominal training image; got none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            students = Students(self.teacher.embed_dim, cfg.student_width).to(self.device)
        optimizer = torch.optim.Adam(students.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(cfg.seed)
        dim = self.teacher.embed_dim
        self.history = []
        students.train()
        epochs = tqdm(range(cfg.epochs), desc="training students", disable=not cfg.progress)
        with flushed_denormals():
            for epoch in epochs:
                losses = []
                for idx in torch.randperm(len(store), generator=order).split(cfg.batch_size):
                    bj, bk = (t.reshape(-1, dim) for t in store.batch(idx.tolist()))
                    pred_j, pred_k = students(bj, bk)
                    loss = transfer_loss(pred_j, bj, pred_k, bk, cfg.loss)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.detach())
                # Checked once per epoch: a per-batch check would wait for the GPU every batch.
                epoch_losses = torch.stack(losses).cpu()
                _check_finite(epoch_losses, epoch, cfg)
                self.history.append(float(epoch_losses.mean()))
                epochs.set_postfix(loss=f"{self.history[-1]:.4f}")
        self.students = students.eval()
        self.token_tier = store.tier
        sync(self.device)
        return self

    # ------------------------------------------------------------------ predict
    def predict_variants(
        self,
        tokens: Sequence[TokenPair],
        sizes: Sequence[tuple[int, int]],
        variants: Sequence[Variant] = ({},),
    ) -> list[Prediction]:
        """One :class:`Prediction` per variant (a dict over fusion, distance, blur overriding
        the config), the students run once per batch. Each prediction's ``seconds`` carry the
        shared students' time and its own maps' time."""
        self.check_fitted("predict")
        if len(tokens) != len(sizes):
            raise ValueError(f"got {len(tokens)} token pairs but {len(sizes)} image sizes")
        return self._predict(self._token_batches(tokens, sizes), variants)

    def _token_batches(
        self, tokens: Sequence[TokenPair], sizes: Sequence[tuple[int, int]]
    ) -> Iterator[TeacherBatch]:
        for chunk in chunks(range(len(tokens)), self.config.batch_size):
            pairs = [tokens[i] for _, i in chunk]
            for f_j, f_k in pairs:
                _check_pair(f_j, f_k, self.teacher.embed_dim)
            f_j, f_k = (
                torch.stack([_tensor(p[side]) for p in pairs]).to(self.device, torch.float32)
                for side in (0, 1)
            )
            yield [tuple(sizes[i]) for _, i in chunk], f_j, f_k, 0.0  # type: ignore[misc]

    @torch.no_grad()
    def _predict(
        self, batches: Iterator[TeacherBatch], variants: Sequence[Variant]
    ) -> list[Prediction]:
        """The one batching loop of prediction: students once per batch, each distance's
        discrepancies once, then fusion + blur per variant."""
        assert self.students is not None
        settings = [self._variant(v) for v in variants]
        out = [Prediction(seconds={"students": 0.0, "maps": 0.0}) for _ in settings]
        grid = self.teacher.grid
        with flushed_denormals():
            for sizes, f_j, f_k, _ in batches:
                start = time.perf_counter()
                pred_j, pred_k = self.students(f_j, f_k)
                deltas = {
                    d: (maps.discrepancy(pred_j, f_j, d), maps.discrepancy(pred_k, f_k, d))
                    for d in dict.fromkeys(s["distance"] for s in settings)
                }
                sync(self.device)
                students_s = time.perf_counter() - start
                for setting, pred in zip(settings, out, strict=True):
                    start = time.perf_counter()
                    fused = maps.fuse(*deltas[setting["distance"]], setting["fusion"])
                    for patch_map, (h, w) in zip(fused.reshape(-1, grid, grid), sizes, strict=True):
                        full = maps.anomaly_map(patch_map, int(h), int(w), setting["blur"])
                        pred.scores.append(maps.image_score(full))
                        pred.maps.append(full.cpu().numpy())
                    sync(self.device)
                    pred.seconds["maps"] += time.perf_counter() - start
                    pred.seconds["students"] += students_s
                release_free_memory()  # transient buffers: keep peak RSS flat in the images
        return out

    def _variant(self, variant: Variant) -> dict[str, Any]:
        unknown = set(variant) - set(INFERENCE_FIELDS)
        if unknown:
            raise ValueError(
                f"variant {dict(variant)} sets {', '.join(sorted(unknown))}: a variant may only "
                f"set the inference-side fields {', '.join(INFERENCE_FIELDS)} (others: a new fit)"
            )
        checked = self.config.replace(**variant)  # validates the values
        return {name: getattr(checked, name) for name in INFERENCE_FIELDS}

    # ------------------------------------------------------ the shared contract
    def _settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.students is not None
        return dict(self.students.state_dict())

    def _extra(self) -> dict[str, Any]:
        return {"history": list(self.history), "token_tier": self.token_tier}

    @classmethod
    def _from_saved(
        cls, saved: SavedDetector, where: str, device: str | None, weights: str | None
    ) -> FBFT:
        """The students on the rebuilt teacher they were trained with (checked by identity)."""
        config = FBFTConfig.from_dict(saved.settings)
        overrides = {k: v for k, v in (("device", device), ("weights", weights)) if v is not None}
        config = config.replace(**overrides)
        teacher = cls._rebuild_teacher(saved, where, config.device, weights)
        model = cls(config, teacher=teacher)
        students = Students(model.teacher.embed_dim, config.student_width)
        students.load_state_dict(saved.state)
        model.students = students.to(model.device).eval()
        model.history = list(saved.extra.get("history", []))
        model.token_tier = saved.extra.get("token_tier")
        return model


def load_official(
    forward_path: str | os.PathLike[str],
    backward_path: str | os.PathLike[str],
    config: FBFTConfig | None = None,
) -> FBFT:
    """A detector with the authors' released students (``forward_net_*.pth`` and
    ``backward_net_*.pth`` of alex-costanzino/L2BT) on the teacher ``config`` describes (by
    default the paper's: DINOv2 ViT-B/14 with registers, blocks 8 and 12, 1036²)."""
    model = FBFT(config or FBFTConfig())
    students = load_official_students(forward_path, backward_path, model.teacher.embed_dim)
    model.students = students.to(model.device).eval()
    return model


class _TeacherEveryBatch:
    """The token source of ``FBFT.fit(images, teacher_per_epoch=True)``: each batch is a fresh
    teacher pass."""

    tier = "teacher-per-epoch"

    def __init__(self, teacher: Teacher, images: Sequence[np.ndarray]) -> None:
        self.teacher, self.images = teacher, list(images)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [self.images[i] for i in indices]
        ((_, f_j, f_k, _),) = self.teacher.batches(chosen, len(chosen))
        return f_j, f_k


def _check_finite(losses: torch.Tensor, epoch: int, cfg: FBFTConfig) -> None:
    """Raise on the first non-finite batch loss of an epoch."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        batch = int(bad[0])
        raise FloatingPointError(
            f"training loss became {float(losses[batch])} at epoch {epoch + 1}, batch "
            f"{batch + 1} (lr={cfg.lr}, loss={cfg.loss}); lower the learning rate or check the "
            "inputs for NaN/inf"
        )


def _tensor(a: Any) -> torch.Tensor:
    """A tensor as is; an array (memory-mapped ones too) read into memory."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def _check_pair(f_j: Any, f_k: Any, dim: int) -> None:
    if tuple(f_j.shape) != tuple(f_k.shape) or len(f_j.shape) != 2 or f_j.shape[-1] != dim:
        raise ValueError(
            f"token pairs must be (N, {dim}) arrays of equal shape; got {tuple(f_j.shape)} "
            f"and {tuple(f_k.shape)}"
        )


def _check_teacher(teacher: Teacher, config: FBFTConfig) -> None:
    """A shared teacher must be the one the config describes (weights are the caller's)."""
    have = {
        "backbone": teacher.backbone,
        "backbone_kwargs": teacher.backbone_kwargs,
        "image_size": teacher.image_size,
        "layers": tuple(teacher.layers),
        "precision": teacher.precision,
        "normalize": teacher.normalize,
    }
    wrong = [
        f"{k}: teacher {have[k]!r} vs config {getattr(config, k)!r}"
        for k in TEACHER_FIELDS
        if have[k] != getattr(config, k)
    ]
    if wrong:
        raise ValueError(
            "the shared teacher does not match the config (" + "; ".join(wrong) + "); build the "
            "teacher from this config (fbft.detectors.fbft.make_teacher) or change the config"
        )
