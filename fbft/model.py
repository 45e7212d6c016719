"""FBFT: fit the two students on a frozen teacher's tokens, predict full-resolution anomaly maps.

The teacher runs once per image: ``fit`` extracts every training image's tokens first, then
trains both students jointly on those tokens for all epochs.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fbft import maps
from fbft.config import FBFTConfig
from fbft.students import Students, transfer_loss
from fbft.teacher import Teacher

FORMAT_VERSION = 1
Tokens = tuple[torch.Tensor, torch.Tensor]


def flush_denormals(method: Callable) -> Callable:
    """Run ``method`` with denormal floats flushed to zero on the CPU.

    Near-zero gradients and the tiny residuals of a random-init teacher (LayerScale 1e-5) produce
    denormal numbers that make CPU arithmetic 10-30x slower; values below 1.2e-38 become 0.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        torch.set_flush_denormal(True)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return wrapper


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


class FBFT:
    """Forward–Backward Feature Transfer anomaly detector.

    >>> model = FBFT(FBFTConfig(...)).fit(train_images)
    >>> maps, scores = model.predict(test_images)
    """

    def __init__(self, config: FBFTConfig | None = None) -> None:
        self.config = config or FBFTConfig()
        self.device = resolve_device(self.config.device)
        if self.config.precision != "fp32" and self.device.type != "cuda":
            raise ValueError(
                f"precision={self.config.precision!r} (autocast) needs a CUDA device; "
                f"this detector runs on {self.device}. Use precision='fp32'."
            )
        self.teacher = Teacher(
            self.config.backbone,
            self.config.layers,
            self.config.image_size,
            weights=self.config.weights,
            backbone_kwargs=self.config.backbone_kwargs,
            seed=self.config.teacher_seed,
        ).to(self.device)
        self.students: Students | None = None
        self.history: list[float] = []
        self.timings: dict[str, float] = {}

    @property
    def teacher_weights(self) -> str:
        """Where the teacher weights came from: hub, hub-cache, file or random."""
        return self.teacher.weights_source

    # ------------------------------------------------------------------ teacher
    def _autocast(self) -> Any:
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @flush_denormals
    def teacher_tokens(self, images: Iterable[np.ndarray]) -> list[Tokens]:
        """One teacher pass per image: (f_j, f_k) of shape (N, D) per image, on the CPU."""
        tokens: list[Tokens] = []
        for batch in _batches(images, self.config.batch_size):
            x = torch.stack([self._preprocess(img, i) for i, img in batch]).to(self.device)
            with self._autocast():
                f_j, f_k = self.teacher(x)
            tokens += zip(f_j.cpu(), f_k.cpu(), strict=True)
        return tokens

    def _preprocess(self, image: np.ndarray, index: int) -> torch.Tensor:
        return maps.preprocess(
            maps.as_rgb(image, f"image {index}"),
            self.config.image_size,
            self.teacher.mean,
            self.teacher.std,
        )

    # -------------------------------------------------------------------- train
    def fit(self, images: Iterable[np.ndarray]) -> FBFT:
        """Train both students on nominal images (each image goes through the teacher once)."""
        return self.fit_tokens(self.teacher_tokens(images))

    @flush_denormals
    def fit_tokens(self, tokens: Sequence[Tokens | tuple[np.ndarray, np.ndarray]]) -> FBFT:
        """Train both students on precomputed teacher tokens, one (f_j, f_k) pair per image."""
        cfg = self.config
        if len(tokens) == 0:
            raise ValueError("fit needs at least one nominal training image; got none")
        start = time.perf_counter()
        f_j = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a, _ in tokens])
        f_k = torch.stack([torch.as_tensor(b, dtype=torch.float32) for _, b in tokens])
        _check_tokens(f_j, f_k, self.teacher.embed_dim)
        f_j, f_k = f_j.to(self.device), f_k.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            students = Students(self.teacher.embed_dim, cfg.student_width).to(self.device)
        optimizer = torch.optim.Adam(students.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(cfg.seed)
        n, dim = f_j.shape[0], f_j.shape[-1]
        self.history = []
        students.train()
        epochs = tqdm(range(cfg.epochs), desc="training students", disable=not cfg.progress)
        for epoch in epochs:
            losses = []
            for idx in torch.randperm(n, generator=order).split(cfg.batch_size):
                idx = idx.to(self.device)
                bj, bk = f_j[idx].reshape(-1, dim), f_k[idx].reshape(-1, dim)
                pred_j, pred_k = students(bj, bk)
                loss = transfer_loss(pred_j, bj, pred_k, bk, cfg.loss)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, batch "
                        f"{len(losses) + 1} (lr={cfg.lr}, loss={cfg.loss}); lower the learning "
                        "rate or check the inputs for NaN/inf"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            self.history.append(float(torch.stack(losses).mean()))
            epochs.set_postfix(loss=f"{self.history[-1]:.4f}")
        self.students = students.eval()
        self._sync()
        self.timings["fit_seconds"] = time.perf_counter() - start
        return self

    # ------------------------------------------------------------------ predict
    @flush_denormals
    def predict(self, images: Iterable[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """Anomaly maps at each image's original H×W (float32) and image scores."""
        out_maps: list[np.ndarray] = []
        out_scores: list[float] = []
        totals = {"teacher": 0.0, "students": 0.0, "maps": 0.0}
        for batch in _batches(images, self.config.batch_size):
            arrays = [maps.as_rgb(img, f"image {i}") for i, img in batch]
            x = torch.stack(
                [self._preprocess(img, i) for (i, _), img in zip(batch, arrays, strict=True)]
            )
            self._sync()
            t0 = time.perf_counter()
            with self._autocast():
                f_j, f_k = self.teacher(x.to(self.device))
            self._sync()
            totals["teacher"] += time.perf_counter() - t0
            batch_maps, batch_scores = self._maps_from_tokens(
                f_j, f_k, [a.shape[:2] for a in arrays], totals
            )
            out_maps += batch_maps
            out_scores += batch_scores
        self._record_timings(totals, len(out_maps))
        return out_maps, out_scores

    @flush_denormals
    def predict_tokens(
        self,
        tokens: Sequence[Tokens | tuple[np.ndarray, np.ndarray]],
        sizes: Sequence[tuple[int, int]],
    ) -> tuple[list[np.ndarray], list[float]]:
        """Like :meth:`predict` from precomputed tokens and the images' (H, W)."""
        if len(tokens) != len(sizes):
            raise ValueError(f"got {len(tokens)} token pairs but {len(sizes)} image sizes")
        out_maps: list[np.ndarray] = []
        out_scores: list[float] = []
        totals = {"teacher": 0.0, "students": 0.0, "maps": 0.0}
        step = self.config.batch_size
        for s in range(0, len(tokens), step):
            chunk = tokens[s : s + step]
            f_j = torch.stack([torch.as_tensor(a, dtype=torch.float32) for a, _ in chunk])
            f_k = torch.stack([torch.as_tensor(b, dtype=torch.float32) for _, b in chunk])
            _check_tokens(f_j, f_k, self.teacher.embed_dim)
            batch_maps, batch_scores = self._maps_from_tokens(
                f_j.to(self.device), f_k.to(self.device), sizes[s : s + step], totals
            )
            out_maps += batch_maps
            out_scores += batch_scores
        self._record_timings(totals, len(out_maps))
        return out_maps, out_scores

    @torch.no_grad()
    def _maps_from_tokens(
        self,
        f_j: torch.Tensor,
        f_k: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        totals: dict[str, float],
    ) -> tuple[list[np.ndarray], list[float]]:
        if self.students is None:
            raise RuntimeError("the students are not trained: call fit() (or FBFT.load) first")
        cfg = self.config
        t0 = time.perf_counter()
        pred_j, pred_k = self.students(f_j, f_k)
        delta = maps.fuse(
            maps.discrepancy(pred_j, f_j, cfg.distance),
            maps.discrepancy(pred_k, f_k, cfg.distance),
            cfg.fusion,
        )
        grid = self.teacher.grid
        patch_maps = delta.reshape(-1, grid, grid)
        self._sync()
        t1 = time.perf_counter()
        out_maps, out_scores = [], []
        for patch_map, (h, w) in zip(patch_maps, sizes, strict=True):
            full = maps.anomaly_map(patch_map, int(h), int(w), cfg.blur)
            out_scores.append(maps.image_score(full))
            out_maps.append(full.cpu().numpy())
        self._sync()
        totals["students"] += t1 - t0
        totals["maps"] += time.perf_counter() - t1
        return out_maps, out_scores

    def _record_timings(self, totals: dict[str, float], n: int) -> None:
        if n:
            for stage, seconds in totals.items():
                self.timings[f"{stage}_ms"] = 1000 * seconds / n

    # -------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the students' weights with the JSON config, teacher identity and format version."""
        if self.students is None:
            raise RuntimeError("nothing to save: the students are not trained (call fit first)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_json(),
            "teacher": json.dumps(self.teacher.describe()),
            "students": {k: v.detach().cpu() for k, v in self.students.state_dict().items()},
            "history": list(self.history),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | None = None, weights: str | None = None
    ) -> FBFT:
        """Load a saved detector; ``device``/``weights`` override where it runs and where the
        teacher weights come from (they must be the same weights the students were trained on)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved FBFT model at {str(path)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        version = state.get("format_version") if isinstance(state, dict) else None
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: unsupported FBFT file format version {version!r} "
                f"(this fbft reads version {FORMAT_VERSION})"
            )
        config = FBFTConfig.from_dict(json.loads(state["config"]))
        overrides = {k: v for k, v in (("device", device), ("weights", weights)) if v is not None}
        model = cls(config.replace(**overrides))
        saved_teacher = json.loads(state["teacher"])
        if saved_teacher["weights"] != model.teacher.weights_id:
            raise ValueError(
                f"{path}: the students were trained with teacher weights {saved_teacher['weights']}"
                f" but the teacher now loads {model.teacher.weights_id}; pass weights=... pointing"
                " at the same weights"
            )
        students = Students(model.teacher.embed_dim, config.student_width)
        students.load_state_dict(state["students"])
        model.students = students.to(model.device).eval()
        model.history = list(state.get("history", []))
        return model


def _batches(images: Iterable[np.ndarray], size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    batch: list[tuple[int, np.ndarray]] = []
    for i, image in enumerate(images):
        batch.append((i, image))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_tokens(f_j: torch.Tensor, f_k: torch.Tensor, dim: int) -> None:
    if f_j.shape != f_k.shape or f_j.ndim != 3 or f_j.shape[-1] != dim:
        raise ValueError(
            f"token pairs must be (N, {dim}) arrays of equal shape; got {tuple(f_j.shape[1:])} "
            f"and {tuple(f_k.shape[1:])}"
        )
