"""PatchCore and SPADE: exact chunked kNN / coreset against brute force, the detector interface,
save / load, and planted defects found on a tiny random-init teacher's tokens."""

from __future__ import annotations

import dataclasses
import json
import math

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


# ---------------------------------------------------------------- the papers' settings (issue 23)
def _local_mean_reference(tokens: np.ndarray, size: int) -> np.ndarray:
    """Each grid cell's mean over its size×size neighbourhood, missing (outside) cells as 0,
    divided by size² (the official unfold with zero padding + mean mapper)."""
    g = math.isqrt(len(tokens))
    grid = tokens.reshape(g, g, -1).astype(np.float64)
    out = np.zeros_like(grid)
    r = size // 2
    for y in range(g):
        for x in range(g):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if 0 <= y + dy < g and 0 <= x + dx < g:
                        out[y, x] += grid[y + dy, x + dx]
    return (out / size**2).reshape(g * g, -1)


def test_local_aggregation_matches_the_neighbourhood_loop() -> None:
    from fbft.detectors.bank import local_mean

    tokens = _rand(36, 5, seed=20)
    np.testing.assert_allclose(
        local_mean(tokens, 3).numpy(), _local_mean_reference(tokens.numpy(), 3), atol=1e-6
    )
    assert local_mean(tokens, 1) is tokens


def test_paper_patchcore_max_score_and_maps_match_brute_force() -> None:
    """patch_size=3, raw features, scorer=max: patch score = distance to the nearest aggregated
    nominal feature; image score = the largest patch score."""
    train, test = _pairs(3, 16, 5, seed=21), _pairs(2, 16, 5, seed=22)
    config = PatchCoreConfig.preset("paper", coreset_ratio=1.0, device="cpu")
    model = PatchCore(config).fit_tokens(train)

    def feats(pair):
        return np.concatenate([_local_mean_reference(np.asarray(a), 3) for a in pair], 1)

    bank = np.concatenate([feats(p) for p in train])
    pred = model.predict_variants(test, [(4, 4)] * 2, [{"blur": "none"}])[0]
    for pair, m, score in zip(test, pred.maps, pred.scores, strict=True):
        want = _brute(feats(pair), bank).min(1)
        np.testing.assert_allclose(m, want.reshape(4, 4), atol=1e-4)
        assert score == pytest.approx(want.max(), abs=1e-4)
    reweighted = PatchCore(dataclasses.replace(config, scorer="reweighted")).fit_tokens(train)
    assert reweighted.predict_variants(test, [(4, 4)] * 2)[0].scores != pred.scores


def _gaussian_reference(image: np.ndarray, sigma: float) -> np.ndarray:
    """2-D Gaussian (truncated at 4σ, normalised) with reflect padding (d c b a | a b c d), as
    a sum of shifted copies of the padded image: scipy.ndimage.gaussian_filter's defaults."""
    r = int(4 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    kernel = np.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), r, mode="symmetric")
    h, w = image.shape
    out = np.zeros((h, w))
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


@pytest.mark.parametrize("shape", [(40, 40), (24, 40), (40, 30)])
def test_gaussian4_blur_is_a_reflect_padded_gaussian_on_the_padded_square(shape) -> None:
    from fbft.core.maps import anomaly_map

    patch = torch.from_numpy(np.random.default_rng(23).random((5, 5)))
    h, w = shape
    side = max(h, w)
    square = anomaly_map(patch, side, side, "none").double().numpy()
    top, left = (side - h) // 2, (side - w) // 2
    want = _gaussian_reference(square, 4.0)[top : top + h, left : left + w]
    got = anomaly_map(patch, h, w, "gaussian4").numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    flat = anomaly_map(torch.ones(5, 5), 40, 40, "gaussian4").numpy()
    np.testing.assert_allclose(flat, 1.0, atol=1e-5)  # reflect padding: no darkened border


def test_spade_per_layer_averages_one_map_per_block() -> None:
    train, test = _pairs(4, 16, 3, seed=24), _pairs(1, 16, 3, seed=25)
    cfg = SPADEConfig(image_k=2, patch_k=2, per_layer=True, normalize=False, device="cpu")
    pred = SPADE(cfg).fit_tokens(train).predict_variants(test, [(4, 4)], [{"blur": "none"}])[0]
    both = [np.concatenate([np.asarray(a), np.asarray(b)], 1) for a, b in (*train, *test)]
    pooled = np.stack([f.mean(0) for f in both[:4]])
    near = np.argsort(_brute(both[4].mean(0, keepdims=True), pooled)[0])[:2]
    per_block = []
    for block in (0, 1):
        gallery = np.concatenate([np.asarray(train[i][block]) for i in near])
        d = np.sort(_brute(np.asarray(test[0][block]), gallery), 1)[:, :2].mean(1)
        per_block.append(d)
    np.testing.assert_allclose(pred.maps[0], np.mean(per_block, 0).reshape(4, 4), atol=1e-4)
