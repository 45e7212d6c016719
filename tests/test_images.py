"""Images and masks decoded as a viewer shows them: EXIF orientation, 16-bit and float pixels
scaled to 8 bits; unknown modes, decompression bombs and FIFOs are one-line errors naming the
file."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

from fbft.data import open_dataset
from fbft.data.common import CorruptImageError, MaskSizeError, Sample
from fbft.data.images import image_size, read_image, read_mask

# What each EXIF orientation means to a viewer (EXIF 2.32, tag 0x0112), written out by hand:
# the displayed array from the stored one.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _stored(shape=(12, 16)) -> np.ndarray:
    """An RGB array whose every pixel is distinct, so any wrong turn shows."""
    h, w = shape
    yx = np.mgrid[0:h, 0:w]
    return np.stack([yx[0] * 10, yx[1] * 10, np.full(shape, 7)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_exif_orientation_is_applied_to_images_masks_and_sizes(tmp_path, orientation, suffix):
    stored = _stored()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(stored).save(path, exif=_exif(orientation))
    shown = UPRIGHT[orientation](stored)
    np.testing.assert_array_equal(read_image(path), shown)
    assert image_size(path) == shown.shape[:2]
    mask = np.zeros((12, 16), np.uint8)
    mask[0, :3] = 255  # three pixels along the stored top edge
    mask_path = tmp_path / f"m{suffix}"
    Image.fromarray(mask).save(mask_path, exif=_exif(orientation))
    np.testing.assert_array_equal(read_mask(mask_path), UPRIGHT[orientation](mask) > 0)
    sample = Sample(str(path), 1, "d", "c", str(mask_path))
    assert sample.mask.shape == sample.size == shown.shape[:2]


def test_rotated_jpeg_is_what_pillow_shows_and_a_mismatch_names_the_displayed_size(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_stored((12, 16))).save(path, exif=_exif(6), quality=95)
    with Image.open(path) as img:
        oracle = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), oracle)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(mask)  # the stored, not displayed, size
    with pytest.raises(MaskSizeError, match=r"is 16x12 \(WxH\) but its image .* is 12x16"):
        _ = Sample(str(path), 1, "d", "c", str(mask)).mask


def test_sixteen_bit_images_are_scaled_by_their_bit_depth_not_saturated(tmp_path):
    values = np.linspace(0, 65535, 12 * 16).reshape(12, 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    got = read_image(path)
    assert got.shape == (12, 16, 3) and (got == want[..., None]).all()
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 100


def test_float_images_in_unit_range_times_255_others_by_their_min_and_max(tmp_path):
    unit = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tiff")[..., 0], np.rint(unit * 255))
    wide = unit * 8 - 3  # -3 .. 5
    Image.fromarray(wide).save(tmp_path / "wide.tiff")
    stretched = np.rint((wide.astype(np.float64) + 3) / 8 * 255)
    np.testing.assert_array_equal(read_image(tmp_path / "wide.tiff")[..., 0], stretched)
    wide[2, 2] = np.nan
    Image.fromarray(wide).save(tmp_path / "nan.tiff")
    with pytest.raises(CorruptImageError, match=r"nan\.tiff holds NaN"):
        read_image(tmp_path / "nan.tiff")


def test_cmyk_is_converted_and_unknown_modes_and_wide_integers_are_named(tmp_path):
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.tiff")
    red = read_image(tmp_path / "cmyk.tiff")
    assert red.shape == (3, 4, 3) and (red == [255, 0, 0]).all()
    Image.new("LAB", (4, 3)).save(tmp_path / "lab.tiff")
    with pytest.raises(CorruptImageError, match=r"lab.tiff has pixel mode 'LAB'") as err:
        read_image(tmp_path / "lab.tiff")
    assert "\n" not in str(err.value)
    Image.fromarray(np.full((3, 4), 70000, np.int32)).save(tmp_path / "int32.tiff")
    with pytest.raises(CorruptImageError, match=r"int32\.tiff holds 32-bit integer pixels"):
        read_image(tmp_path / "int32.tiff")


def test_decompression_bomb_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit, set low
    for read in (read_image, image_size, read_mask):
        with pytest.raises(CorruptImageError, match=r"bomb\.png has too many pixels") as err:
            read(tmp_path / "bomb.png")
        assert "\n" not in str(err.value)


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            read_image(fifo)
        except CorruptImageError as err:
            errors.append(err)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert errors and "not a regular file" in str(errors[0]) and str(fifo) in str(errors[0])


def test_a_dataset_of_rotated_photos_scores_against_matching_masks(tmp_path):
    """The study path: samples from a dataset folder decode upright, masks likewise."""
    base = tmp_path / "widget"
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (base / folder).mkdir(parents=True)
    image = _stored((12, 16))
    Image.fromarray(image).save(base / "train/good/000.png", exif=_exif(8))
    Image.fromarray(image).save(base / "test/crack/000.png", exif=_exif(8))
    Image.fromarray(image).save(base / "test/good/000.png")
    mask = np.zeros((12, 16), np.uint8)
    mask[1, 1] = 255
    Image.fromarray(mask).save(base / "ground_truth/crack/000_mask.png", exif=_exif(8))
    (crack,) = [s for s in open_dataset(tmp_path, "widget", "test") if s.label]
    assert crack.image.shape[:2] == crack.mask.shape == (16, 12)
    assert crack.mask[UPRIGHT[8](mask) > 0].all() and crack.mask.sum() == 1
    assert open_dataset(tmp_path, "widget", "train").sizes() == [(16, 12)]


def test_mask_reading_keeps_its_name_in_errors(tmp_path):
    bad = tmp_path / "m.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CorruptImageError, match=r"mask file .*m\.png"):
        read_mask(bad)
