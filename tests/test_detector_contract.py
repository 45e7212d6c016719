"""One estimator contract for every registered detector, as scikit-learn's ``check_estimator``
holds every estimator to one: fit returns self, one not-fitted error, save -> load_detector
round-trips, variants equal single predictions, describe() has the shared keys, every setting
is checked. Tiny random-init teachers (tests/tiny.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny import textures, tiny_config

from fbft.core.config import FBFTConfig, choices
from fbft.detectors import create_detector, detector_class, load_detector, methods
from fbft.detectors.base import DESCRIBE_KEYS, Detector, NotFittedError
from fbft.detectors.patchcore import PatchCore, PatchCoreConfig
from fbft.detectors.saved import FORMAT_VERSION, read_detector
from fbft.detectors.spade import SPADE, SPADEConfig

CONFIG = tiny_config(epochs=2)
SIZES = [(56, 70), (40, 40)]
VARIANTS = {
    "fbft": [{}, {"fusion": "sum"}, {"blur": "none"}, {"distance": "cosine", "blur": "none"}],
    "patchcore": [{}, {"blur": "none"}, {"blur": "official"}],
    "spade": [{}, {"blur": "none"}, {"blur": "official"}],
}


@pytest.fixture(scope="module")
def images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    test = [textures(1, seed=1, shape=s)[0] for s in SIZES]
    return textures(4, seed=0), test


@pytest.fixture(scope="module", params=methods())
def fitted(request, images):
    detector = create_detector(request.param, CONFIG, preset="paper")
    assert detector.fit(images[0]) is detector  # fit returns self
    return detector


def test_every_built_in_method_is_registered_and_meets_the_protocol():
    assert {"fbft", "patchcore", "spade"} <= set(methods())
    for method in methods():
        cls = detector_class(method)
        assert cls.method == method and callable(cls.load)


def test_fit_tokens_returns_self(fitted, images):
    tokens = fitted.teacher.encode(images[0])
    fresh = create_detector(fitted.method, CONFIG, preset="paper")
    assert fresh.fit_tokens(tokens) is fresh and isinstance(fresh, Detector)


@pytest.mark.parametrize("method", methods())
def test_predict_and_save_before_fit_raise_the_shared_error(method, images, tmp_path):
    detector = create_detector(method, CONFIG, preset="paper")
    name = type(detector).__name__
    tokens = detector.teacher.encode(images[1])
    for call in (
        lambda: detector.predict(images[1]),
        lambda: detector.predict_variants(tokens, SIZES),
        lambda: detector.save(tmp_path / "x.pt"),
    ):
        with pytest.raises(NotFittedError, match=rf"^{name} is not fitted: call fit\(\)"):
            call()
    assert not (tmp_path / "x.pt").exists()
    info = detector.describe()
    assert tuple(info) == DESCRIBE_KEYS and info["fitted"] is False
    json.dumps(info)


def test_save_load_detector_round_trips_to_equal_maps(fitted, images, tmp_path):
    path = fitted.save(tmp_path / "d.pt")
    saved = read_detector(path)
    assert (saved.method, saved.format_version) == (fitted.method, FORMAT_VERSION)
    assert saved.teacher["identity"] == fitted.teacher.describe()
    loaded = load_detector(path)
    assert type(loaded) is type(fitted)
    assert load_detector(path, device="cpu").describe()["settings"]["device"] == "cpu"
    expected, got = fitted.predict(images[1]), loaded.predict(images[1])
    assert all(np.array_equal(a, b) for a, b in zip(expected[0], got[0], strict=True))
    assert expected[1] == got[1]
    assert loaded.describe() == fitted.describe()
    other = next(m for m in methods() if m != fitted.method)
    with pytest.raises(ValueError, match=f"holds a {fitted.method} detector"):
        detector_class(other).load(path)


def test_variants_equal_single_predictions(fitted, images):
    tokens = fitted.teacher.encode(images[1])
    variants = VARIANTS[fitted.method]
    together = fitted.predict_variants(tokens, SIZES, variants)
    for variant, pred in zip(variants, together, strict=True):
        (alone,) = fitted.predict_variants(tokens, SIZES, [variant])
        assert all(np.array_equal(a, b) for a, b in zip(pred.maps, alone.maps, strict=True))
        assert pred.scores == alone.scores
        assert [m.shape for m in pred.maps] == SIZES
    maps, scores = fitted.predict(images[1])  # images == tokens + the detector's own settings
    assert all(np.array_equal(a, b) for a, b in zip(maps, together[0].maps, strict=True))
    assert scores == together[0].scores


def test_describe_is_json_and_has_the_shared_keys(fitted):
    info = json.loads(json.dumps(fitted.describe()))
    assert tuple(info) == DESCRIBE_KEYS
    assert info["method"] == fitted.method and info["fitted"] is True
    assert info["teacher"] == json.loads(json.dumps(fitted.teacher.describe()))
    assert info["state"] and all(isinstance(s, list) for s in info["state"].values())


def _settings(config_class: type) -> list[tuple[str, object]]:
    """Every (field, value) a config's Literal and bool fields allow."""
    out = [(name, v) for name, allowed in choices(config_class).items() for v in allowed]
    out += [(f.name, b) for f in dataclasses.fields(config_class) if f.type == "bool"
            for b in (False, True)]  # fmt: skip
    return out


BANK_SETTINGS = [
    (cls, name, value)
    for cls in (PatchCore, SPADE)
    for name, value in _settings(cls.config_class)
    if name not in ("device",)
]


@pytest.fixture(scope="module")
def tokens(images):
    teacher = create_detector("patchcore", CONFIG).teacher
    return teacher.encode(images[0]), teacher.encode(images[1])


@pytest.mark.parametrize(("cls", "name", "value"), BANK_SETTINGS, ids=str)
def test_every_baseline_setting_fits_and_predicts(cls, name, value, tokens):
    train, test = tokens
    config = cls.config_class(**{name: value, "device": "cpu"})
    pred = cls(config).fit_tokens(train).predict_variants(test, SIZES)[0]
    assert [m.shape for m in pred.maps] == SIZES
    assert all(np.isfinite(m).all() for m in pred.maps) and np.isfinite(pred.scores).all()


@pytest.mark.parametrize("cls", [PatchCore, SPADE])
def test_bad_baseline_settings_name_the_field(cls):
    for name in choices(cls.config_class):
        with pytest.raises(ValueError, match=rf"{cls.config_class.__name__}\.{name}="):
            cls.config_class(**{name: "nonsense"})
    with pytest.raises(ValueError, match=r"unknown .* preset 'best'"):
        cls.config_class.preset("best")


def test_the_published_settings_build_detectors_that_fit_and_predict(tokens):
    train, test = tokens
    for detector in (
        PatchCore(PatchCoreConfig(patch_size=3, normalize=False, scorer="max", blur="gaussian4")),
        SPADE(SPADEConfig(per_layer=True, blur="gaussian4")),
    ):
        pred = detector.fit_tokens(train).predict_variants(test, SIZES)[0]
        assert [m.shape for m in pred.maps] == SIZES
    assert PatchCoreConfig.preset("paper") == PatchCoreConfig(
        patch_size=3, normalize=False, scorer="max", blur="gaussian4"
    )
    assert PatchCoreConfig.preset("fbft-maps") == PatchCoreConfig()  # today's defaults
    assert (
        SPADEConfig.preset("paper").per_layer and SPADEConfig.preset("fbft-maps") == SPADEConfig()
    )


FBFT_SETTINGS = [
    (name, v)
    for name, v in _settings(FBFTConfig)
    if name in ("loss", "normalize", "precision") and v != CONFIG.__dict__[name]
]


@pytest.mark.parametrize(("name", "value"), FBFT_SETTINGS, ids=str)
def test_every_fbft_training_setting_fits_and_predicts(name, value, images):
    """(fusion, distance, blur are variants: checked above.)"""
    config = CONFIG.replace(**{name: value})
    if name == "precision" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            create_detector("fbft", config)
        return
    maps, scores = create_detector("fbft", config).fit(images[0]).predict(images[1])
    assert [m.shape for m in maps] == SIZES and np.isfinite(scores).all()


def test_files_written_before_format_2_still_load(images, tmp_path):
    """FBFT's version-1 file had no ``method``: it is read as an FBFT file."""
    model = create_detector("fbft", CONFIG).fit(images[0])
    legacy = {
        "format_version": 1,
        "config": model.config.to_json(),
        "teacher": json.dumps(model.teacher.describe()),
        "students": {k: v.clone() for k, v in model.students.state_dict().items()},
        "history": list(model.history),
    }
    torch.save(legacy, tmp_path / "v1.pt")
    loaded = load_detector(tmp_path / "v1.pt")
    assert loaded.method == "fbft" and loaded.history == model.history
    expected, got = model.predict(images[1])[0], loaded.predict(images[1])[0]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
