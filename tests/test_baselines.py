"""PatchCore and SPADE: exact chunked kNN / coreset against brute force, the detector interface,
save / load, and planted defects found on a tiny random-init teacher's tokens."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import textures, tiny_config, with_defect

from fbft import FBFT
from fbft.detectors import SPADE, PatchCore, PatchCoreConfig, SPADEConfig, greedy_coreset, knn
from fbft.detectors.base import Detector, NotFittedError
from fbft.metrics import evaluate


def _brute(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    q, b = q.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1))


def _greedy_reference(x: np.ndarray, n: int, start: int) -> list[int]:
    """The obvious k-center greedy: each step, the row farthest from its nearest chosen row."""
    chosen = [start]
    while len(chosen) < n:
        d = _brute(x, x[chosen]).min(1)
        chosen.append(int(np.argmax(d)))
    return chosen


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 24])
def test_knn_matches_brute_force_for_any_chunk(chunk: int, k: int) -> None:
    q, b = _rand(37, 12, seed=0), _rand(53, 12, seed=1)
    full = _brute(q.numpy(), b.numpy())
    dist, idx = knn(q, b, k=k, chunk=chunk)
    order = np.argsort(full, 1)[:, :k]
    assert np.array_equal(idx[:, 0].numpy(), np.argmin(full, 1))
    assert np.array_equal(idx.numpy(), order)
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(full, order, 1), atol=1e-4)


def test_knn_blocks_stay_within_the_chunk_budget(monkeypatch) -> None:
    import fbft.detectors.neighbours as neighbours

    seen: list[int] = []
    real = neighbours.squared_distances

    def spy(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(q.shape[0] * b.shape[0])
        return real(q, b)

    monkeypatch.setattr(neighbours, "squared_distances", spy)
    knn(_rand(300, 4, seed=14), _rand(500, 4, seed=15), k=3, chunk=1000)
    assert seen and max(seen) <= 1000


def test_knn_float16_bank_and_bad_arguments() -> None:
    q, b = _rand(5, 8, seed=2), _rand(9, 8, seed=3)
    _, idx = knn(q, b.half(), chunk=10)
    full = _brute(q.numpy(), b.half().float().numpy())
    assert np.array_equal(idx[:, 0].numpy(), np.argmin(full, 1))
    with pytest.raises(ValueError, match=r"k must be in 1\.\.9"):
        knn(q, b, k=10)
    with pytest.raises(ValueError, match="bank"):
        knn(q, b[:, :4])


@pytest.mark.parametrize("chunk", [1, 50, 1 << 24])
def test_greedy_coreset_matches_reference(chunk: int) -> None:
    x = _rand(60, 6, seed=4)
    chosen = greedy_coreset(x, 15, start=3, chunk=chunk)
    assert chosen.tolist() == _greedy_reference(x.numpy(), 15, 3)


def _pairs(n: int, tokens: int, dim: int, seed: int, kind: str = "numpy") -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (rng.normal(size=(tokens, dim)).astype(np.float32) for _ in range(2))
        if kind == "float16":
            a, b = a.astype(np.float16), b.astype(np.float16)
        if kind == "tensor":
            a, b = torch.from_numpy(a), torch.from_numpy(b)
        out.append((a, b))
    return out


def test_full_coreset_is_exact_nearest_neighbour_search() -> None:
    train, test = _pairs(3, 16, 5, seed=5), _pairs(2, 16, 5, seed=6)
    model = PatchCore(PatchCoreConfig(coreset_ratio=1.0, device="cpu")).fit_tokens(train)
    feats = [model.features(p).numpy() for p in (*train, *test)]
    bank = np.concatenate(feats[:3])
    assert np.array_equal(model.bank.numpy(), bank)
    pred = model.predict_variants(test, [(4, 4)] * 2, [{"blur": "none"}])[0]
    for f, m in zip(feats[3:], pred.maps, strict=True):
        want = _brute(f, bank).min(1).reshape(4, 4)
        np.testing.assert_allclose(m, want, atol=1e-4)  # 4x4 -> 4x4 without blur is identity


def test_exact_coreset_selects_greedy_rows_and_projection_keeps_full_width() -> None:
    train = _pairs(4, 16, 6, seed=7)
    exact = PatchCore(PatchCoreConfig(coreset_ratio=0.25, projection_dim=None, device="cpu"))
    exact.fit_tokens(train)
    allf = np.concatenate([exact.features(p).numpy() for p in train])
    start = int(torch.randint(64, (1,), generator=torch.Generator().manual_seed(0)))
    np.testing.assert_array_equal(exact.bank.numpy(), allf[_greedy_reference(allf, 16, start)])
    approx = PatchCore(PatchCoreConfig(coreset_ratio=0.25, projection_dim=4, device="cpu"))
    bank = approx.fit_tokens(train).bank.numpy()
    assert bank.shape == (16, 12)
    assert all((row == allf).all(1).any() for row in bank)  # real rows, full width


@pytest.mark.parametrize("kind", ["float16", "tensor"])
def test_results_do_not_depend_on_chunk_or_input_kind(kind: str, tmp_path) -> None:
    train, test = _pairs(4, 16, 8, seed=8), _pairs(2, 16, 8, seed=9)
    memmaps = []
    for i, (a, b) in enumerate(test):
        mm = np.lib.format.open_memmap(tmp_path / f"{i}.npy", "w+", np.float32, a.shape)
        mm[:] = a
        memmaps.append((np.load(tmp_path / f"{i}.npy", mmap_mode="r"), b))
    conv = _pairs(4, 16, 8, seed=8, kind=kind)
    for cls, cfg in ((PatchCore, PatchCoreConfig), (SPADE, SPADEConfig)):
        small = cls(cfg(chunk=3, device="cpu")).fit_tokens(train)
        big = cls(cfg(device="cpu")).fit_tokens(conv)
        p1, p2 = (m.predict_variants(memmaps, [(10, 7), (5, 9)])[0] for m in (small, big))
        tol = 1e-2 if kind == "float16" else 1e-5
        for a, b in zip(p1.maps, p2.maps, strict=True):
            np.testing.assert_allclose(a, b, atol=tol)
        np.testing.assert_allclose(p1.scores, p2.scores, atol=tol)


def test_spade_gallery_and_scores() -> None:
    train, test = _pairs(5, 16, 4, seed=10), _pairs(1, 16, 4, seed=11)
    cfg = SPADEConfig(image_k=2, patch_k=3, device="cpu")
    model = SPADE(cfg).fit_tokens(train)
    feats = [model.features(p).numpy() for p in (*train, *test)]
    pooled = np.stack([f.mean(0) for f in feats[:5]])
    img_d = _brute(feats[5].mean(0, keepdims=True), pooled)[0]
    near = np.argsort(img_d)[:2]
    pred = model.predict_variants(test, [(4, 4)], [{"blur": "none"}])[0]
    want = np.sort(_brute(feats[5], np.concatenate([feats[i] for i in near])), 1)[:, :3].mean(1)
    np.testing.assert_allclose(pred.maps[0], want.reshape(4, 4), atol=1e-4)
    assert pred.scores[0] == pytest.approx(np.sort(img_d)[:2].mean(), abs=1e-5)
    half = SPADE(dataclasses.replace(cfg, bank_dtype="float16")).fit_tokens(train)
    assert half.bank.dtype == torch.float16
    half_pred = half.predict_variants(test, [(4, 4)], [{"blur": "none"}])[0]
    np.testing.assert_allclose(half_pred.maps[0], pred.maps[0], atol=2e-2)


def test_interface_variants_sizes_and_save_load(tmp_path) -> None:
    train, test = _pairs(3, 16, 8, seed=12), _pairs(2, 16, 8, seed=13)
    sizes = [(30, 17), (12, 40)]
    for model in (PatchCore(PatchCoreConfig(coreset_ratio=0.5)), SPADE(SPADEConfig(image_k=2))):
        assert isinstance(model, Detector)
        model.fit_tokens(train)
        preds = model.predict_variants(test, sizes, [{}, {"blur": "none"}])
        assert [m.shape for m in preds[0].maps] == sizes and preds[0].maps[0].dtype == np.float32
        assert not np.allclose(preds[0].maps[0], preds[1].maps[0])
        with pytest.raises(ValueError, match="'fusion'"):
            model.predict_variants(test, sizes, [{"fusion": "sum"}])
        loaded = type(model).load(model.save(tmp_path / f"{model.method}.pt"))
        again = loaded.predict_variants(test, sizes)[0]
        for a, b in zip(preds[0].maps, again.maps, strict=True):
            assert np.array_equal(a, b)
        assert again.scores == preds[0].scores
        assert loaded.describe() == model.describe()
        assert json.loads(json.dumps(model.describe()))["method"] == model.method
    with pytest.raises(ValueError, match="holds a spade detector"):
        PatchCore.load(tmp_path / "spade.pt")
    with pytest.raises(NotFittedError, match="SPADE is not fitted"):
        SPADE().predict_variants(test, sizes)[0]
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0)
    with pytest.raises(ValueError, match="at least one"):
        PatchCore().fit_tokens([])
    with pytest.raises(ValueError, match="square grid"):
        SPADE().fit_tokens(_pairs(1, 15, 8, seed=0))
    with pytest.raises(ValueError, match="image 0: 5x5 patches"):
        PatchCore().fit_tokens(train).predict_variants(_pairs(1, 25, 8, seed=0), [(5, 5)])[0]


@pytest.fixture(scope="module")
def planted() -> tuple[list, list, list, list]:
    teacher = FBFT(tiny_config(image_size=112))
    train = teacher.teacher.encode(textures(8, seed=0, shape=(112, 112)))
    good = textures(3, seed=1, shape=(112, 112))
    bad, masks = zip(
        *(with_defect(img, (40, 44, 24, 24)) for img in textures(3, seed=2, shape=(112, 112))),
        strict=True,
    )
    test = teacher.teacher.encode([*good, *bad])
    masks = [np.zeros((112, 112), bool)] * 3 + list(masks)
    return train, test, [(112, 112)] * 6, masks


@pytest.mark.parametrize(
    "model",
    [PatchCore(PatchCoreConfig(coreset_ratio=0.25)), SPADE(SPADEConfig())],
    ids=["patchcore", "spade"],
)
def test_planted_defects_are_found(model, planted) -> None:
    train, test, sizes, masks = planted
    pred = model.fit_tokens(train).predict_variants(test, sizes)[0]
    result = evaluate(pred.maps, masks, scores=pred.scores)
    assert result["p_auroc"] > 0.8
    assert result["i_auroc"] > 0.8
