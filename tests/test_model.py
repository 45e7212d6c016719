"""FBFT fit / predict / save / load with tiny random-init teachers and generated images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import textures, tiny_config, with_defect

from fbft import FBFT, FBFTConfig, preset
from fbft.detectors.base import NotFittedError
from fbft.detectors.fbft import load_official


@pytest.fixture(scope="module")
def trained() -> FBFT:
    return FBFT(tiny_config()).fit(textures(8, seed=0))


def test_a_defect_lights_the_map_inside_more_than_outside(trained):
    good = textures(3, seed=1)
    bad, masks = zip(
        *(with_defect(img, (20, 22, 12, 12)) for img in textures(3, seed=2)), strict=True
    )
    maps_, scores = trained.predict(list(good) + list(bad))
    for m, mask in zip(maps_[3:], masks, strict=True):
        assert m[mask].mean() > 2 * m[~mask].mean()
    assert min(scores[3:]) > max(scores[:3])


@pytest.mark.parametrize("shape", [(130, 90), (90, 130), (57, 57)])
def test_maps_have_each_images_original_size(trained, shape):
    images = textures(2, seed=3, shape=shape)
    maps_, scores = trained.predict(images)
    assert [m.shape for m in maps_] == [shape, shape]
    assert all(m.dtype == np.float32 for m in maps_) and len(scores) == 2


def test_seeded_training_is_deterministic_and_seeds_matter():
    train, test = textures(4, seed=4), textures(2, seed=5)
    a = FBFT(tiny_config(epochs=3)).fit(train).predict(test)[0]
    b = FBFT(tiny_config(epochs=3)).fit(train).predict(test)[0]
    c = FBFT(tiny_config(epochs=3, seed=1)).fit(train).predict(test)[0]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_save_load_round_trip_gives_identical_maps(trained, tmp_path):
    test = textures(2, seed=6, shape=(60, 45))
    path = trained.save(tmp_path / "model" / "fbft.pt")
    loaded = FBFT.load(path)
    assert loaded.config == trained.config and loaded.history == trained.history
    for x, y in zip(trained.predict(test)[0], loaded.predict(test)[0], strict=True):
        assert np.array_equal(x, y)
    # a teacher other than the one the students were trained on is refused
    with pytest.raises(ValueError, match="teacher weights"):
        FBFT.load(_resaved_with(trained, tmp_path, teacher_seed=5))


def _resaved_with(model: FBFT, tmp_path, **changes) -> str:
    """A saved file whose teacher record builds a teacher other than the one it was trained on."""
    state = torch.load(model.save(tmp_path / "x.pt"), weights_only=True)
    record = json.loads(state["teacher"])
    record["config"].update(changes)
    state["teacher"] = json.dumps(record)
    torch.save(state, tmp_path / "y.pt")
    return str(tmp_path / "y.pt")


def test_load_rejects_other_formats_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved detector"):
        FBFT.load(tmp_path / "missing.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 99"):
        FBFT.load(tmp_path / "future.pt")


def test_tokens_api_equals_images_api(trained):
    train, test = textures(3, seed=7), textures(2, seed=8, shape=(40, 70))
    by_images = FBFT(tiny_config(epochs=2)).fit(train)
    model = FBFT(tiny_config(epochs=2))
    model.fit_tokens(model.teacher.encode(train))
    expected = by_images.predict(test)[0]
    got = model.predict_variants(model.teacher.encode(test), [t.shape[:2] for t in test])[0].maps
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


@pytest.mark.parametrize(
    "changes",
    [{"loss": "l2"}, {"distance": "cosine"}, {"fusion": "sum"}, {"fusion": "j"}, {"fusion": "k"}],
)
def test_options_change_the_maps(trained, changes):
    test = textures(1, seed=9)
    model = FBFT(tiny_config(**changes)).fit(textures(8, seed=0))
    assert not np.allclose(model.predict(test)[0][0], trained.predict(test)[0][0])


def test_stage_seconds_and_history_are_recorded(trained):
    pred = trained.predict_detailed(textures(2, seed=10))
    assert set(pred.seconds) == {"teacher", "students", "maps"}
    assert all(v > 0 for v in pred.seconds.values()) and len(pred.maps) == 2
    assert not hasattr(trained, "timings")
    assert len(trained.history) == trained.config.epochs
    assert trained.history[-1] < trained.history[0]


VARIANTS = [
    {},
    {"fusion": "sum"},
    {"distance": "cosine", "fusion": "j"},
    {"blur": "none"},
    {"distance": "cosine", "fusion": "product", "blur": "none"},
]


def test_each_variant_equals_a_model_configured_with_it(trained):
    """One fit, many maps: the students run once, yet every variant gives exactly the maps of a
    model trained with that variant in its config (training does not depend on these fields)."""
    test = textures(5, seed=11, shape=(40, 70))
    tokens, sizes = trained.teacher.encode(test), [t.shape[:2] for t in test]
    preds = trained.predict_variants(tokens, sizes, VARIANTS)
    for variant, pred in zip(VARIANTS, preds, strict=True):
        oracle = FBFT(trained.config.replace(**variant)).fit(textures(8, seed=0))
        expected_maps, expected_scores = oracle.predict(test)
        assert all(np.array_equal(x, y) for x, y in zip(expected_maps, pred.maps, strict=True))
        assert expected_scores == pred.scores
    assert preds[0].maps[0].shape == (40, 70)
    with pytest.raises(ValueError, match="inference-side fields"):
        trained.predict_variants(tokens, sizes, [{"lr": 1.0}])
    with pytest.raises(ValueError, match="fusion"):
        trained.predict_variants(tokens, sizes, [{"fusion": "max"}])


def test_describe_and_a_shared_teacher(trained):
    info = trained.describe()
    assert info["method"] == FBFT.method == "fbft" and info["extra"]["token_tier"] == "host"
    assert info["teacher"] == trained.teacher.describe() and info["settings"]["epochs"] == 15
    shared = FBFT(tiny_config(epochs=2, seed=3), teacher=trained.teacher)
    assert shared.teacher is trained.teacher
    with pytest.raises(ValueError, match="image_size"):
        FBFT(tiny_config(image_size=84), teacher=trained.teacher)


class OfficialMLP(torch.nn.Module):
    """The authors' FeatureProjectionMLP (models/students.py of alex-costanzino/L2BT)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.input = torch.nn.Linear(dim, dim)
        self.projection = torch.nn.Linear(dim, dim)
        self.output = torch.nn.Linear(dim, dim)

    def forward(self, x):
        act = torch.nn.GELU()
        return self.output(act(self.projection(act(self.input(x)))))


def test_official_student_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    forward, backward = OfficialMLP(48), OfficialMLP(48)
    torch.save(forward.state_dict(), tmp_path / "forward_net_x.pth")
    torch.save(backward.state_dict(), tmp_path / "backward_net_x.pth")
    model = load_official(
        tmp_path / "forward_net_x.pth", tmp_path / "backward_net_x.pth", tiny_config()
    )
    f_j, f_k = torch.randn(10, 48), torch.randn(10, 48)
    pred_j, pred_k = model.students(f_j, f_k)
    assert torch.equal(pred_j, backward(f_k)) and torch.equal(pred_k, forward(f_j))
    assert len(model.predict(textures(1, seed=0))[0]) == 1
    with pytest.raises(ValueError, match="not an official"):
        load_official(
            model.save(tmp_path / "ours.pt"), tmp_path / "backward_net_x.pth", tiny_config()
        )


def test_errors_are_clear():
    model = FBFT(tiny_config())
    with pytest.raises(ValueError, match="at least one nominal training image"):
        model.fit([])
    with pytest.raises(NotFittedError, match="FBFT is not fitted"):
        model.predict(textures(1, seed=0))
    nan_tokens = [(torch.full((16, 48), float("nan")), torch.zeros(16, 48))]
    with pytest.raises(FloatingPointError, match="epoch 1"):
        model.fit_tokens(nan_tokens)
    with pytest.raises(ValueError, match=r"\(N, 48\)"):
        model.fit_tokens([(np.zeros((16, 32)), np.zeros((16, 32)))])
    with pytest.raises(ValueError, match="uint8"):
        model.fit([np.zeros((56, 56, 3), np.float32)])
    with pytest.raises(ValueError, match="CUDA"):
        FBFT(tiny_config(precision="bf16", device="cpu"))
    with pytest.raises(ValueError, match="fusion"):
        tiny_config(fusion="max")


def test_presets():
    assert preset("paper") == FBFTConfig()
    cpu = preset("cpu", epochs=3)
    assert cpu.image_size % 14 == 0 and "small" in cpu.backbone and cpu.epochs == 3
    with pytest.raises(ValueError, match="known presets"):
        preset("gpu")


def test_dinov2_shaped_vit_s14_random_init_separates_simple_defects():
    """The full-depth ViT-S/14 shape at 224², random weights, default blocks 8 and 12."""
    cfg = FBFTConfig(
        backbone="vit_small_patch14_reg4_dinov2", weights="random", image_size=224, progress=False
    )
    train = textures(6, seed=20, shape=(224, 224))
    good = textures(3, seed=21, shape=(224, 224))
    bad = [with_defect(img, (90, 100, 24, 24))[0] for img in textures(3, seed=22, shape=(224, 224))]
    _, scores = FBFT(cfg).fit(train).predict(good + bad)
    assert min(scores[3:]) > max(scores[:3])
