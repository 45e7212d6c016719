"""Memory and time of FBFT as the number of training images grows, tokens in a bounded store.

A ViT-B-shaped teacher (embed_dim 768, 12 heads, random init, only 2 blocks so that the CPU can
run it) at 1036² gives 5476 tokens of 768 per block and image, as the paper's ViT-B/14. Each
image count is fitted (and then predicted) in a fresh process, so the peak RSS
(``ru_maxrss``) and, on CUDA, the peak device memory belong to that count alone. With
``max_token_gb`` small the tokens go to files, and memory should not grow with the images.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, parser, save, table

from fbft import FBFT, FBFTConfig

ORIGINAL = 224  # test images' side: maps at this size stay small beside the tokens
VISA = {"VisA category (905 images)": 905, "all of VisA (~9k train images)": 9000}


def config(size: int, depth: int, max_token_gb: float) -> FBFTConfig:
    return FBFTConfig(
        backbone="vit_base_patch14_reg4_dinov2", weights="random", image_size=size,
        layers=(depth - 1, depth), backbone_kwargs={"depth": depth}, epochs=1, progress=False,
        max_token_gb=max_token_gb,
    )  # fmt: skip


def token_bytes(size: int, itemsize: int, dim: int = 768, patch: int = 14) -> int:
    """Bytes of one image's (f_j, f_k) tokens: 2 × (S/14)² × D × itemsize."""
    return 2 * (size // patch) ** 2 * dim * itemsize


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, (ORIGINAL, ORIGINAL, 3), dtype=np.uint8) for _ in range(n)]


def peaks() -> dict[str, float]:
    out = {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
    if torch.cuda.is_available():
        out["cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def worker(stage: str, n: int, cfg: FBFTConfig, model_path: Path) -> dict:
    """One measurement in this (fresh) process: fit on n images and save, or load and predict."""
    start = time.perf_counter()
    if stage == "fit":
        model = FBFT(cfg).fit(images(n))
        model.save(model_path)
        return {"seconds": time.perf_counter() - start, "tier": model.token_tier, **peaks()}
    model = FBFT.load(model_path)
    pred = model.predict_detailed(images(n))
    return {"seconds": time.perf_counter() - start, "teacher_s": pred.seconds["teacher"], **peaks()}


def measure(stage: str, n: int, cfg: FBFTConfig, model_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, str(n), cfg.to_json(), str(model_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{stage} on {n} images failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row_for(n: int, cfg: FBFTConfig, folder: Path) -> dict:
    fit = measure("fit", n, cfg, folder / f"{n}.pt")
    pred = measure("predict", n, cfg, folder / f"{n}.pt")
    teacher_per_image = pred["teacher_s"] / n
    row = {
        "images": n,
        "tokens_gb": n * token_bytes(cfg.image_size, 4) / 1e9,
        "tier": fit["tier"],
        "fit_peak_rss_gb": fit["rss_gb"],
        "predict_peak_rss_gb": pred["rss_gb"],
        "fit_peak_cuda_gb": fit.get("cuda_gb"),
        "predict_peak_cuda_gb": pred.get("cuda_gb"),
        "fit_s": fit["seconds"],
        "teacher_s_per_image": teacher_per_image,
        "epoch_s": fit["seconds"] - n * teacher_per_image,  # fit = teacher pass + 1 epoch
    }
    print(table([row], list(row)), flush=True)
    return row


def projections(rows: list[dict], size: int) -> list[dict]:
    """Cache size and time of a VisA category and of all VisA from the largest measured row."""
    last = rows[-1]
    out = []
    for name, n in VISA.items():
        out.append({
            "set": name,
            "cache_fp32_gb": n * token_bytes(size, 4) / 1e9,
            "cache_fp16_gb": n * token_bytes(size, 2) / 1e9,
            "peak_rss_gb (flat)": max(r["fit_peak_rss_gb"] for r in rows),
            "teacher_s": n * last["teacher_s_per_image"],
            "epoch_s": n * last["epoch_s"] / last["images"],
        })  # fmt: skip
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        stage, n, cfg_json, path = sys.argv[2:6]
        cfg = FBFTConfig.from_dict(json.loads(cfg_json))
        print(json.dumps(worker(stage, int(n), cfg, Path(path))))
        return
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=None, help="default: 8 32 64")
    p.add_argument("--size", type=int, default=1036)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--max-token-gb", type=float, default=0.25)
    args = p.parse_args()
    counts = args.images or [8, 32, 64]
    size = args.size
    if args.quick:
        counts, size = [2, 6], 224
        args.max_token_gb = min(args.max_token_gb, 0.004)
    cfg = config(size, args.depth, args.max_token_gb)
    with tempfile.TemporaryDirectory(prefix="fbft-scale-") as folder:
        rows = [row_for(n, cfg, Path(folder)) for n in counts]
    per_image = {"float32": token_bytes(size, 4), "float16": token_bytes(size, 2)}
    proj = projections(rows, size)
    info = machine()
    print(f"\n{info['gpu'] or info['cpu']} ({info['cores']} cores); max_token_gb="
          f"{args.max_token_gb}; cache bytes per image: {per_image}\n")  # fmt: skip
    print(table(rows, list(rows[0])))
    print()
    print(table(proj, list(proj[0])))
    save("scale", args, rows, projections=proj, token_bytes_per_image=per_image, size=size)


if __name__ == "__main__":
    main()
