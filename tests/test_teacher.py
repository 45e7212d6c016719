"""The frozen teacher: tokens, layer/size checks, and every way of getting weights."""

from __future__ import annotations

import hashlib

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from tiny import TINY

from fbft.core import maps
from fbft.core.teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    TeacherWeightsError,
    check_backbone,
    file_sha256,
    resolve_weights,
)

ARCH = "vit_small_patch14_reg4_dinov2"


def source_model(seed: int = 3, image_size: int = 56) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        ARCH, pretrained=False, img_size=image_size, num_classes=0, **TINY
    ).eval()


def reference_tokens(model: torch.nn.Module, x: torch.Tensor, blocks: tuple[int, int]):
    """Blocks run one by one, final LayerNorm applied, prefix tokens dropped (1-indexed blocks)."""
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        out = []
        for i, block in enumerate(model.blocks, start=1):
            t = block(t)
            if i in blocks:
                out.append(model.norm(t)[:, model.num_prefix_tokens :])
    return out


def test_tokens_are_normed_patch_tokens_of_the_chosen_blocks():
    teacher = Teacher(ARCH, (2, 3), 56, "random", TINY, seed=3)
    assert len(teacher.model.blocks) == 3  # block 4 is never run
    x = torch.randn(2, 3, 56, 56)
    f_j, f_k = teacher(x)
    assert f_j.shape == f_k.shape == (2, 16, 48)
    ref_j, ref_k = reference_tokens(source_model(3), x, (2, 3))
    assert torch.equal(f_j, ref_j) and torch.equal(f_k, ref_k)
    assert teacher.weights_source == "random" and "seed=3" in teacher.weights_id
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("layers", [(0, 4), (3, 3), (4, 2), (2, 5)])
def test_bad_layers_name_the_valid_range(layers):
    with pytest.raises(ValueError, match="between 1 and 4"):
        Teacher(ARCH, layers, 56, "random", TINY)


def test_bad_image_size_names_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match="42 or 56"):
        Teacher(ARCH, (2, 4), 50, "random", TINY)
    with pytest.raises(ValueError, match="nearest valid sizes are 14"):
        Teacher(ARCH, (2, 4), 9, "random", TINY)


def test_missing_weights_file_and_unknown_backbone():
    with pytest.raises(FileNotFoundError, match=r"no/such/weights\.pth"):
        Teacher(ARCH, (2, 4), 56, "no/such/weights.pth", TINY)
    with pytest.raises(ValueError, match="unknown timm backbone"):
        Teacher("vit_nonexistent_patch99", (2, 4), 56, "random")


def meta_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights laid out as Meta's DINOv2 checkpoints (cls position in pos_embed,
    register_tokens, mask_token)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reg = state.pop("reg_token")
    pos = state.pop("pos_embed")
    state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    state["register_tokens"] = reg
    state["mask_token"] = torch.zeros(1, pos.shape[-1])
    return state


@pytest.mark.parametrize("layout", ["timm.pth", "timm.safetensors", "meta.pth"])
def test_local_weight_files_load_through_timm_converters(tmp_path, layout):
    source = source_model(seed=11)
    path = tmp_path / f"weights.{layout}"
    if layout == "timm.pth":
        torch.save(source.state_dict(), path)
    elif layout == "timm.safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(meta_state_dict(source), path)
    teacher = Teacher(ARCH, (2, 4), 56, str(path), TINY)
    assert teacher.weights_source == "file" and teacher.weights_id.startswith("sha256:")
    x = torch.randn(1, 3, 56, 56)
    ref_j, ref_k = reference_tokens(source, x, (2, 4))
    f_j, f_k = teacher(x)
    assert torch.allclose(f_j, ref_j, atol=1e-5) and torch.allclose(f_k, ref_k, atol=1e-5)
    # another resolution: the position embeddings are resampled at load time
    larger = Teacher(ARCH, (2, 4), 84, str(path), TINY)
    assert larger(torch.randn(1, 3, 84, 84))[0].shape == (1, 36, 48)


def test_auto_without_hub_falls_back_loudly_to_random(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        teacher = Teacher(ARCH + ".lvd142m", (2, 4), 56, "auto", TINY)
    assert teacher.weights_source == "random"
    with pytest.raises(TeacherWeightsError, match="weights=<checkpoint file>"):
        Teacher(ARCH + ".lvd142m", (2, 4), 56, "hub", TINY)


def test_a_non_vit_backbone_is_named_as_such():
    with pytest.raises(
        ValueError, match="'resnet18' is not a ViT with blocks/forward_intermediates"
    ):
        check_backbone("resnet18")
    with pytest.raises(ValueError, match="not a ViT"):
        Teacher("resnet18", (2, 4), 56, "random")
    assert check_backbone(ARCH, TINY) == (14, 4)


def test_garbage_weights_file_is_named(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TeacherWeightsError, match=r"garbage\.pth"):
        Teacher(ARCH, (2, 4), 56, str(path), TINY)


def test_resolve_weights_gives_a_file_or_random(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save(source_model().state_dict(), path)
    assert resolve_weights(ARCH, str(path)) == str(path)
    assert resolve_weights(ARCH, "random") == "random"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        assert resolve_weights(ARCH + ".lvd142m", "auto") == "random"
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_is_preprocess_then_forward_and_describe_covers_token_settings():
    teacher = Teacher(ARCH, (2, 4), 56, "random", TINY, seed=3)
    images = [np.random.default_rng(i).integers(0, 256, (40, 70, 3), np.uint8) for i in range(5)]
    tokens = teacher.encode(images, batch_size=2)
    x = torch.stack([maps.preprocess(img, 56, IMAGENET_MEAN, IMAGENET_STD) for img in images])
    ref_j, ref_k = teacher(x)
    assert len(tokens) == 5 and all(t[0].dtype == torch.float32 for t in tokens)
    assert torch.allclose(torch.stack([t[0] for t in tokens]), ref_j, atol=1e-6)
    assert torch.allclose(torch.stack([t[1] for t in tokens]), ref_k, atol=1e-6)
    info = teacher.describe()
    assert {"backbone", "weights", "image_size", "layers", "precision", "normalize"} <= set(info)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Teacher(ARCH, (2, 4), 56, "random", TINY, precision="bf16").encode(images)


def test_normalize_imagenet_or_the_backbones_own():
    vit16 = "vit_small_patch16_224.augreg_in21k"
    kwargs = {"depth": 2, "embed_dim": 48, "num_heads": 2}
    assert Teacher(vit16, (1, 2), 64, "random", kwargs).mean == IMAGENET_MEAN
    own = Teacher(vit16, (1, 2), 64, "random", kwargs, normalize="backbone")
    assert own.mean == own.std == (0.5, 0.5, 0.5) and own.describe()["normalize"] == "backbone"
