"""Bounded token memory: every tier gives the same batches, so the same students."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import textures, tiny_config

from fbft import FBFT
from fbft.core.tokens import TokenStore

CPU = torch.device("cpu")


def pairs(n: int, seed: int = 0, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [tuple(rng.standard_normal((2, 16, 48)).astype(dtype)) for _ in range(n)]


def memmaps(tokens, folder: Path) -> list[tuple[np.memmap, np.memmap]]:
    out = []
    for i, (a, b) in enumerate(tokens):
        np.save(folder / f"{i}.npy", np.stack([a, b]))
        pair = np.load(folder / f"{i}.npy", mmap_mode="r")
        out.append((pair[0], pair[1]))
    return out


def test_every_tier_gives_the_same_float32_batches(tmp_path):
    tokens = pairs(7, dtype=np.float16)
    expected = [(torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32)))
                for a, b in tokens]  # fmt: skip
    mapped = memmaps(tokens, tmp_path)
    stores = {
        "host": TokenStore.of(tokens, CPU, None),
        "spilled": TokenStore.of(tokens, CPU, 0.0),
        "mixed": TokenStore.of(tokens, CPU, 3 * 2 * 16 * 48 * 2 / 1e9),
        "memmap": TokenStore.of(mapped, CPU, None),
    }
    assert [s.tier for s in stores.values()] == ["host", "memmap", "memmap", "memmap"]
    assert stores["memmap"]._spill is None  # referenced, not copied
    spill = stores["spilled"]._spill
    assert spill is not None and len(list(spill.iterdir())) == 7
    for idx in ([0], [6, 2, 3], list(range(7))):
        want_j = torch.stack([expected[i][0] for i in idx])
        want_k = torch.stack([expected[i][1] for i in idx])
        for store in stores.values():
            got_j, got_k = store.batch(idx)
            assert got_j.dtype == torch.float32
            assert torch.equal(got_j, want_j) and torch.equal(got_k, want_k)
    for store in stores.values():
        store.close()
    assert not spill.exists()


def students_equal(a: FBFT, b: FBFT) -> bool:
    sa, sb = a.students.state_dict(), b.students.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fits_from_every_tier_are_identical(tmp_path):
    images = textures(6, seed=0)
    in_memory = FBFT(tiny_config(epochs=3)).fit(images)
    spilled = FBFT(tiny_config(epochs=3, max_token_gb=0.0)).fit(images)
    assert (in_memory.token_tier, spilled.token_tier) == ("host", "memmap")
    assert students_equal(in_memory, spilled) and in_memory.history == spilled.history
    tokens = [(a.numpy(), b.numpy()) for a, b in in_memory.teacher.encode(images)]
    from_memmaps = FBFT(tiny_config(epochs=3)).fit_tokens(memmaps(tokens, tmp_path))
    assert from_memmaps.token_tier == "memmap" and students_equal(in_memory, from_memmaps)
    with pytest.raises(ValueError, match="max_token_gb"):
        tiny_config(max_token_gb=-1)


RUN = """
import json, resource, sys
import numpy as np
import torch
from fbft import FBFT, FBFTConfig
n = int(sys.argv[1])
cfg = FBFTConfig(
    backbone="vit_small_patch14_reg4_dinov2", weights="random", image_size=700, layers=(1, 2),
    backbone_kwargs={"depth": 2, "embed_dim": 384, "num_heads": 6, "mlp_ratio": 1.0},
    student_width=32, epochs=1, progress=False, device="cpu", max_token_gb=0.05,
)
images = [np.full((28, 28, 3), i, np.uint8) for i in range(n)]
model = FBFT(cfg).fit(images)
tokens_bytes = n * 2 * model.teacher.grid ** 2 * model.teacher.embed_dim * 4
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss": rss, "tokens": tokens_bytes, "tier": model.token_tier}))
"""


def peak(n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN), str(n)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_in_the_number_of_images():
    """64 images of ~0.5 GB of tokens with a 0.05 GB budget: peak RSS grows by far less than
    the tokens' size compared with 8 images (measured in fresh processes)."""
    small, large = peak(8), peak(64)
    assert large["tokens"] > 0.45e9 and large["tier"] == "memmap"
    assert large["rss"] - small["rss"] < 0.2 * large["tokens"], (small, large)
