"""fbft.metrics against a slow, obviously-correct oracle written from the definitions."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
import torch

from fbft.metrics import MetricAccumulator, evaluate, metric_keys

LIMITS = {"30": 0.3, "10": 0.1, "5": 0.05, "1": 0.01}
# Several cases have only anomalous images, where I-AUROC is NaN by design (warned).
pytestmark = pytest.mark.filterwarnings("ignore:I-AUROC is undefined")


# ----------------------------------------------------------------------------- the oracle
def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first flood fill."""
    seen = np.zeros(mask.shape, bool)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append(pixels)
    return found


def collect(maps, masks):
    comps, nominal = [], []
    for m, g in zip(maps, masks, strict=True):
        g = np.asarray(g) != 0
        for pixels in components(g):
            comps.append(np.array([m[p] for p in pixels], dtype=np.float64))
        nominal.extend(np.asarray(m, dtype=np.float64)[~g].tolist())
    return comps, np.array(nominal)


def area_to(points, limit):
    """Trapezoid area of a polyline (ascending x) from 0 to limit, interpolating at limit."""
    total = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            total += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                total += (limit - x0) * (y0 + y_at) / 2
            break
    return total


def oracle_exact(maps, masks, subset):
    """One curve point per distinct score t, a pixel positive when score >= t."""
    comps, nominal = collect(maps, masks)
    chosen = [c for c in comps if subset(c.size)]
    thresholds = sorted({float(v) for m in maps for v in np.ravel(m)}, reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        fpr = float(np.mean(nominal >= t))
        pro = float(np.mean([np.mean(c >= t) for c in chosen]))
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    return {lim: area_to(points, limit) / limit for lim, limit in LIMITS.items()}


def oracle_official(maps, masks, subset, num_thresholds=99):
    """The L2BT protocol, written from its definition: sampled nominal thresholds, strict >."""
    comps, nominal = collect(maps, masks)
    chosen = [c for c in comps if subset(c.size)]
    ordered = np.sort(nominal)
    n = ordered.size
    points = [(1.0, 1.0)]
    for pos in np.linspace(0, n - 1, num=num_thresholds).astype(int):
        t = ordered[pos]
        points.append((1.0 - (pos + 1) / n, float(np.mean([np.mean(c > t) for c in chosen]))))
    points.reverse()
    out = {}
    for lim, limit in LIMITS.items():
        xs = [p[0] for p in points]
        if limit in xs:  # exactly on a point: no interpolation
            kept = [p for p in points if p[0] <= limit]
            out[lim] = area_to(kept, limit) / limit
        else:
            out[lim] = area_to(points, limit) / limit
    return out


def oracle_auroc(scores, labels):
    """Pairwise: P(positive > negative) + 0.5 P(tie)."""
    pos = [s for s, lab in zip(scores, labels, strict=True) if lab]
    neg = [s for s, lab in zip(scores, labels, strict=True) if not lab]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def oracle_all(maps, masks, num_thresholds=None):
    comps, _ = collect(maps, masks)
    sizes = np.array([c.size for c in comps])
    q = np.quantile(sizes, [0.25, 0.5, 0.75])
    subsets = [lambda s, v=v: s <= v for v in q] + [lambda s: True]
    if num_thresholds is None:
        per_q = [oracle_exact(maps, masks, sub) for sub in subsets]
    else:
        per_q = [oracle_official(maps, masks, sub, num_thresholds) for sub in subsets]
    out = {f"aupro_{lim}": per_q[3][lim] for lim in LIMITS}
    for lim in ("30", "5"):
        for i in range(4):
            out[f"aupro_{lim}_q{i + 1}"] = per_q[i][lim]
        a1, a4 = per_q[0][lim], per_q[3][lim]
        w = np.mean([per_q[i][lim] for i in range(4)])
        out[f"rho_{lim}"] = 0.0 if max(a1, a4) == 0 else w * (1 - abs(a4 - a1) / max(a1, a4))
    pixels = np.concatenate([np.ravel(m) for m in maps])
    truth = np.concatenate([np.ravel(g) != 0 for g in masks])
    out["p_auroc"] = oracle_auroc(pixels.tolist(), truth.tolist())
    scores = []
    for m in maps:
        flat = np.sort(np.ravel(m))[::-1]
        scores.append(float(np.mean(flat[: max(1, int(0.001 * flat.size))])))
    labels = [int(np.any(g)) for g in masks]
    out["i_auroc"] = oracle_auroc(scores, labels)
    out.update({f"size_q{i + 1}": float(v) for i, v in enumerate(q)})
    return out


# ----------------------------------------------------------------------------- cases
def random_case(rng, shape=(17, 23), n_images=5, levels=6, max_blobs=3):
    """Maps with heavily tied scores (few levels), blobs of varied size, some nominal images."""
    maps, masks = [], []
    for i in range(n_images):
        m = rng.integers(0, levels, size=shape).astype(np.float64) / levels
        g = np.zeros(shape, bool)
        if i % 3 != 2:
            for _ in range(rng.integers(1, max_blobs + 1)):
                y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
                h, w = rng.integers(1, 6, size=2)
                g[y : y + h, x : x + w] = True
            m[g] = np.minimum(1.0, m[g] + rng.integers(0, 3) / levels)
        maps.append(m)
        masks.append(g)
    return maps, masks


def assert_matches(ours, expected, tol):
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=tol, nan_ok=True), key


@pytest.mark.parametrize("seed", range(6))
def test_exact_mode_matches_oracle_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    maps, masks = random_case(rng)
    assert_matches(evaluate(maps, masks), oracle_all(maps, masks), 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_official_mode_matches_oracle(seed):
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_case(rng, shape=(30, 26), levels=50)
    expected = oracle_all(maps, masks, num_thresholds=99)
    assert_matches(evaluate(maps, masks, num_thresholds=99), expected, 1e-12)


def test_official_mode_with_few_nominal_pixels_repeats_thresholds():
    # Fewer nominal pixels than thresholds: positions repeat; the protocol still holds.
    rng = np.random.default_rng(7)
    m = rng.random((6, 8))
    g = np.ones((6, 8), bool)
    g[0, :5] = False
    expected = oracle_all([m], [g], num_thresholds=99)
    ours = evaluate([m], [g], num_thresholds=99)
    for key in ("aupro_30", "aupro_5", "aupro_1"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-12)


def test_one_pixel_and_corner_touching_components_are_8_connected():
    m = np.zeros((8, 9))
    g = np.zeros((8, 9), bool)
    g[1, 1] = g[2, 2] = True  # touch at a corner: one component of 2 px (4-connectivity: two)
    g[5, 6] = True  # a lone 1-px component
    m[1, 1], m[2, 2], m[5, 6] = 0.9, 0.1, 0.8
    m[0, 0] = 0.5
    ours = evaluate([m], [g])
    assert ours["size_q1"] == pytest.approx(np.quantile([2, 1], 0.25))
    assert_matches(ours, oracle_all([m], [g]), 1e-12)


def test_non_square_single_component():
    rng = np.random.default_rng(11)
    m = rng.random((13, 31))
    g = np.zeros((13, 31), bool)
    g[4:9, 10:20] = True
    m[g] += 0.2
    nominal = rng.random((13, 31))
    maps, masks = [m, nominal], [g, np.zeros_like(g)]
    ours = evaluate(maps, masks)
    assert_matches(ours, oracle_all(maps, masks), 1e-12)
    # one component: every cumulative subset is the whole set, so rho equals the AUPRO
    assert ours["aupro_30_q1"] == ours["aupro_30_q4"] == ours["rho_30"]


def test_all_components_of_one_size():
    rng = np.random.default_rng(5)
    maps, masks = [], []
    for i in range(4):
        m, g = rng.random((20, 20)), np.zeros((20, 20), bool)
        g[2 + i : 5 + i, 3:6] = True  # all 3x3
        m[g] += rng.random()
        maps.append(m)
        masks.append(g)
    ours = evaluate(maps, masks)
    assert ours["size_q1"] == ours["size_q3"] == 9
    assert_matches(ours, oracle_all(maps, masks), 1e-12)


def test_quartile_subsets_restrict_pro_not_fpr():
    # Small defect found perfectly, large defect missed: Q1 = small only -> AUPRO(Q1) = 1.
    m = np.zeros((40, 40))
    g = np.zeros((40, 40), bool)
    g[2, 2] = True
    m[2, 2] = 1.0
    g[10:30, 10:30] = True  # missed: scores 0 like the background
    big = np.zeros((40, 40), bool)
    big[20:22, 30:32] = True
    maps, masks = [m, np.zeros((40, 40))], [g, big]
    ours = evaluate(maps, masks)
    assert ours["aupro_30_q1"] == pytest.approx(1.0)
    assert ours["aupro_30_q4"] < 0.7
    assert_matches(ours, oracle_all(maps, masks), 1e-12)


def test_rho_is_zero_when_both_auprOs_are_zero():
    from fbft.metrics.quartiles import robustness

    assert robustness([0.0, 0.3, 0.2, 0.0]) == 0.0
    assert robustness([0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert robustness([0.4, 0.6, 0.7, 0.8]) == pytest.approx(np.mean([0.4, 0.6, 0.7, 0.8]) * 0.5)


def test_keys_labels_and_scores_arguments():
    rng = np.random.default_rng(1)
    maps, masks = random_case(rng)
    ours = evaluate(maps, masks)
    assert list(ours) == metric_keys()
    assert ours["aupro_30"] == ours["aupro_30_q4"]
    # explicit labels/scores override the defaults for I-AUROC only
    labels = [1, 0, 0, 1, 0]
    scores = [0.9, 0.1, 0.2, 0.8, 0.3]
    custom = evaluate(maps, masks, labels=labels, scores=scores)
    assert custom["i_auroc"] == 1.0
    assert custom["aupro_30"] == ours["aupro_30"]


def test_accumulator_streaming_equals_one_shot_and_both_modes_share_data():
    rng = np.random.default_rng(9)
    maps, masks = random_case(rng, n_images=7, levels=20)
    acc = MetricAccumulator()
    for m, g in zip(maps, masks, strict=True):
        acc.update(m.astype(np.float32), g.astype(np.uint8))
    one_shot = evaluate([m.astype(np.float32) for m in maps], masks)
    assert acc.compute() == one_shot
    assert acc.compute(99) == evaluate(
        [m.astype(np.float32) for m in maps], masks, num_thresholds=99
    )
    # the curve accessor: FPR ascending from 0, PRO rows per quartile within [0, 1]
    fpr, pros = acc.curves.up_to(0.3)
    assert fpr[0] == 0 and fpr[-1] == pytest.approx(0.3) and np.all(np.diff(fpr) >= 0)
    assert set(pros) == {"q1", "q2", "q3", "q4"}
    assert all(p.min() >= 0 and p.max() <= 1 for p in pros.values())


@pytest.mark.parametrize("pixels", [None, 10, 10_000])
def test_accumulator_storage_modes_agree(pixels):
    """Preallocated buffer, too small a buffer, no buffer; mixed dtypes switch to chunks."""
    rng = np.random.default_rng(13)
    maps, masks = random_case(rng, n_images=6, levels=30)
    maps = [m.astype(np.float32) if i < 3 else m for i, m in enumerate(maps)]
    acc = MetricAccumulator(pixels=pixels)
    for m, g in zip(maps[:3], masks[:3], strict=True):
        acc.update(m, g)
    first = acc.compute()
    for m, g in zip(maps[3:], masks[3:], strict=True):
        acc.update(m, g)
    assert acc.compute() == evaluate(maps, masks)
    assert first == evaluate(maps[:3], masks[:3])


def test_torch_sorting_path_equals_numpy():
    """The path used on a GPU, run here with torch on the CPU."""
    from fbft.metrics import pro

    rng = np.random.default_rng(12)
    maps, masks = random_case(rng, shape=(30, 20), levels=40)
    expected = evaluate(maps, masks)
    values = rng.integers(0, 40, 500).astype(np.float32)
    by_torch = pro.SortedScores(values.copy(), torch.device("cpu"))
    by_numpy = pro.SortedScores(values.copy())
    needles = np.array([-1.0, 0.0, 3.0, 3.5, 39.0, 41.0])
    for inclusive in (True, False):
        assert np.array_equal(
            by_torch.count_below(needles, inclusive), by_numpy.count_below(needles, inclusive)
        )
    positions = np.array([0, 7, 499])
    assert np.array_equal(by_torch.take(positions), by_numpy.take(positions))
    acc = MetricAccumulator(device="cpu")
    acc.device = torch.device("cpu")  # force the torch path
    for m, g in zip(maps, masks, strict=True):
        acc.update(m, g)
    assert acc.compute() == pytest.approx(expected, nan_ok=True)


def test_i_auroc_is_nan_with_a_warning_when_all_images_share_a_label():
    m, g = np.zeros((4, 5)), np.zeros((4, 5), bool)
    g[1, 1] = True
    with pytest.warns(UserWarning, match="I-AUROC is undefined"):
        assert np.isnan(evaluate([m, m], [g, g])["i_auroc"])


def test_errors_are_clear():
    m, g = np.zeros((4, 5)), np.zeros((4, 5), bool)
    with pytest.raises(ValueError, match=r"image 1.*shape"):
        evaluate([m, np.zeros((4, 6))], [g, g])
    with pytest.raises(ValueError, match="no maps"):
        evaluate([], [])
    with pytest.raises(ValueError, match="anomalous pixel"):
        evaluate([m, m], [g, g])
    bad = m.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image 0.*NaN"):
        evaluate([bad], [g])
    with pytest.raises(ValueError, match="2 maps but 1 masks"):
        evaluate([m, m], [g])


@pytest.mark.parametrize(
    ("labels", "found"), [([0, 2, 0, 2, 0], r"\[0, 2\]"), ([-1, 1, 1, -1, 1], r"\[-1, 1\]")]
)
def test_non_binary_labels_are_refused_with_the_values_found(labels, found):
    """{0, 2} used to divide by zero and {-1, 1} to give NaN silently."""
    maps, masks = random_case(np.random.default_rng(2))
    with pytest.raises(ValueError, match=rf"labels must be binary.*found the values {found}"):
        evaluate(maps, masks, labels=labels)
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match=r"labels\[0\] is 2"):
        acc.update(maps[0], masks[0], label=2)
    assert len(acc) == 0


def test_bool_numpy_and_tensor_labels_equal_int_labels():
    maps, masks = random_case(np.random.default_rng(3))
    ints = [1, 0, 0, 1, 0]
    expected = evaluate(maps, masks, labels=ints)
    for labels in (
        [bool(v) for v in ints],
        np.array(ints, dtype=bool),
        torch.tensor(ints),
        [1.0, 0.0, 0.0, 1.0, 0.0],
    ):
        assert evaluate(maps, masks, labels=labels) == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_torch_maps_masks_and_scores_of_any_dtype(dtype):
    """Tensors as a model returns them (requires_grad, half precision) give the numpy result."""
    maps, masks = random_case(np.random.default_rng(4), levels=8)
    tensors = [torch.tensor(m, dtype=dtype, requires_grad=True) for m in maps]
    widened = [t.detach().float().double().numpy() for t in tensors]  # the same values in numpy
    scores = torch.linspace(0, 1, len(maps), dtype=dtype, requires_grad=True)
    ours = evaluate(tensors, [torch.from_numpy(g) for g in masks], scores=scores)
    expected = evaluate(widened, masks, scores=[float(s) for s in scores.detach().float()])
    assert ours == pytest.approx(expected, nan_ok=True)
    assert evaluate(torch.stack(tensors), torch.from_numpy(np.stack(masks))) == pytest.approx(
        evaluate(widened, masks), nan_ok=True
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_accepted():
    maps, masks = random_case(np.random.default_rng(5))
    cuda = [torch.tensor(m, device="cuda", requires_grad=True) for m in maps]
    masks_cuda = [torch.tensor(g, device="cuda") for g in masks]
    assert evaluate(cuda, masks_cuda) == pytest.approx(evaluate(maps, masks), nan_ok=True)


def test_meaningless_inputs_are_refused_naming_argument_and_index():
    maps, masks = random_case(np.random.default_rng(6))
    cases = [
        ({1: torch.tensor(maps[1], dtype=torch.complex64)}, {}, {}, r"maps\[1\].*complex"),
        ({}, {0: masks[0].astype(np.complex128)}, {}, r"masks\[0\].*complex"),
        ({0: maps[0][None]}, {}, {}, r"maps\[0\].*shape \(1, 17, 23\)"),
        (
            {2: np.where(np.eye(17, 23, dtype=bool), -np.inf, maps[2])},
            {},
            {},
            r"maps\[2\].*NaN or inf",
        ),
        ({3: np.array(["a"] * 4)}, {}, {}, r"maps\[3\].*dtype <U1"),
        ({}, {}, {1: float("nan")}, r"scores\[1\].*finite"),
        ({}, {}, {4: torch.ones(2)}, r"scores\[4\].*one real number"),
    ]
    for map_changes, mask_changes, score_changes, message in cases:
        m = [map_changes.get(i, v) for i, v in enumerate(maps)]
        g = [mask_changes.get(i, v) for i, v in enumerate(masks)]
        s = [score_changes.get(i, 0.5) for i in range(len(maps))]
        with pytest.raises(ValueError, match=message):
            evaluate(m, g, scores=s)
