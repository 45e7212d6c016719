"""Steps 2 and 4 of the device check: the paper's setting timed, and PatchCore at 1 M tokens.

Step 2 (``paper``): the device's measured GEMM rate (fp32, bf16); ViT-B/14 at 1036² teacher ms
per image (batch 1 and 8, fp32 and bf16) with FLOPs and MFU; the students' training and
inference tokens/s; the maps' ms at 1500²; one VisA-sized category's training, cached vs the
official per-epoch loop, projected from a measured subset of images and epochs. Step 4
(``bank``): greedy coreset (10%) and exact kNN on 1 M patch features. Every timing is
CUDA-synchronised (``common.timed``: torch.utils.benchmark; or :func:`device_record.clock`);
each check records its peak ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import timed
from device_record import PAPER_EPOCHS, VISA_CATEGORY, Recorder, clock
from inference import GPU_PEAKS, flops
from torch.utils.flop_counter import FlopCounterMode

from fbft import FBFT, FBFTConfig
from fbft.core.students import Students, transfer_loss
from fbft.detectors.neighbours import greedy_coreset, knn, random_projection


def run_paper(rec: Recorder, ctx: dict[str, Any]) -> None:
    dev, s = rec.device, ctx["sizes"]
    rec.check("gemm rate", lambda: gemm(rec))
    for precision in ("fp32", "bf16"):
        for batch in s["batches"]:
            name = f"teacher {precision} batch {batch}"
            if precision != "fp32" and dev.type != "cuda":
                rec.skip(name, "autocast needs CUDA")
                continue
            rec.check(name, lambda p=precision, b=batch: teacher(rec, s, p, b), needs=["gemm"])
    rec.check("students", lambda: students(rec, s), needs=["fp32"])
    rec.check(f"maps at {s['map_side']}²", lambda: maps(rec, s), needs=["fp32"])
    rec.check("training: cached", lambda: cached(rec, s))
    rec.check("training: per-epoch teacher", lambda: per_epoch(rec, s))
    rec.check(
        "training: VisA category projected", lambda: projection(rec), needs=["cached", "loop"]
    )


def gemm(rec: Recorder) -> dict[str, Any]:
    """Measured dense GEMM TFLOP/s per precision: the MFU denominator (datasheet beside it)."""
    dev = rec.device
    n = 8192 if dev.type == "cuda" else 1024
    rates, sheet = {}, {}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype != torch.float32 and dev.type != "cuda":
            continue
        a = torch.randn(n, n, device=dev, dtype=dtype)
        seconds = timed(lambda a=a: a @ a, dev, warmup=2, repeat=5)
        rates[precision] = 2 * n**3 / seconds
        sheet.update({f"datasheet_{precision}_tflops": p[precision] / 1e12
                      for k, p in GPU_PEAKS.items() if k in name})  # fmt: skip
    rec.state["gemm"] = rates
    return {f"gemm_{p}_tflops": r / 1e12 for p, r in rates.items()} | sheet | {"n": n}


def paper_model(s: dict[str, Any], precision: str, dev: torch.device, **changes: Any) -> FBFT:
    cfg = FBFTConfig(weights="random", device=str(dev), precision=precision, progress=False,
                     **{"epochs": 1, **s["paper"], **changes})  # fmt: skip
    return FBFT(cfg)


def teacher(rec: Recorder, s: dict[str, Any], precision: str, batch: int) -> dict[str, Any]:
    dev = rec.device
    if precision not in rec.state:
        model = paper_model(s, precision, dev)
        zeros = torch.zeros(model.teacher.grid**2, model.teacher.embed_dim)
        rec.state[precision] = model.fit_tokens([(zeros, zeros)])  # students for the maps check
        rec.state[f"{precision}_gflop"] = flops(model, 1, dev)[0] / 1e9
    model, size = rec.state[precision], s["paper"]["image_size"]
    x = torch.randn(batch, 3, size, size, device=dev)
    warmup, repeat = s["timing"]
    seconds = timed(lambda: model.teacher(x), dev, warmup, repeat)
    gflop = rec.state[f"{precision}_gflop"]
    per_image = seconds / batch
    return {
        "ms_per_image": 1000 * per_image,
        "images_per_s": 1 / per_image,
        "GFLOP_per_image": gflop,
        "MFU_%": 100 * gflop * 1e9 / per_image / rec.state["gemm"][precision],
    }


def students(rec: Recorder, s: dict[str, Any]) -> dict[str, Any]:
    """Both students on 4 images' tokens: training steps (Adam) and inference, tokens/s."""
    dev, model = rec.device, rec.state["fp32"]
    dim, tokens = model.teacher.embed_dim, 4 * model.teacher.grid**2
    net = Students(dim).to(dev)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    f_j, f_k = torch.randn(tokens, dim, device=dev), torch.randn(tokens, dim, device=dev)

    def step() -> None:
        loss = transfer_loss(*_interleave(net(f_j, f_k), (f_j, f_k)), "cosine")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    train_flop = counter.get_total_flops()
    warmup, repeat = s["timing"]
    train_s = timed(step, dev, warmup, repeat)
    with torch.no_grad():
        infer_s = timed(lambda: net(f_j, f_k), dev, warmup, repeat)
    rec.state["train_tokens_per_s"] = tokens / train_s
    return {
        "tokens_per_step": tokens,
        "train_tokens_per_s": tokens / train_s,
        "inference_tokens_per_s": tokens / infer_s,
        "train_MFU_%": 100 * train_flop / train_s / rec.state["gemm"]["fp32"],
    }


def _interleave(preds: tuple, feats: tuple) -> tuple:
    return preds[0], feats[0], preds[1], feats[1]


def maps(rec: Recorder, s: dict[str, Any]) -> dict[str, Any]:
    """The maps of ``maps`` images at side² from token batches (students included apart)."""
    model, side, n = rec.state["fp32"], s["map_side"], s["maps"]
    grid, dim = model.teacher.grid, model.teacher.embed_dim
    gen = torch.Generator().manual_seed(0)
    tokens = [(torch.randn(grid**2, dim, generator=gen), torch.randn(grid**2, dim, generator=gen))
              for _ in range(n)]  # fmt: skip
    warmup, repeat = s["timing"]
    runs = [model.predict_variants(tokens, [(side, side)] * n)[0].seconds
            for _ in range(warmup + repeat)][warmup:]  # fmt: skip
    return {f"{k}_ms_per_image": 1000 * float(np.median([r[k] for r in runs])) / n
            for k in ("students", "maps")}  # fmt: skip


def _images(s: dict[str, Any], rec: Recorder) -> list[np.ndarray]:
    if "images" not in rec.state:
        rng, side = np.random.default_rng(0), s["train_side"]
        rec.state["images"] = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                               for _ in range(s["train_images"])]  # fmt: skip
    return rec.state["images"]


def cached(rec: Recorder, s: dict[str, Any]) -> dict[str, Any]:
    """Teacher once per image (pre-processing included), then ``cached_epochs`` on the tokens."""
    images, epochs = _images(s, rec), s["cached_epochs"]
    model = paper_model(s, "fp32", rec.device, epochs=epochs)
    tokens, teacher_s = clock(
        lambda: model.teacher.encode(images, model.config.batch_size), rec.device
    )
    _, fit_s = clock(lambda: model.fit_tokens(tokens), rec.device)
    n = len(images)
    rec.state["cached"] = {"teacher_s_per_image": teacher_s / n,
                           "epoch_s_per_image": fit_s / epochs / n}  # fmt: skip
    return {"images": n, "epochs": epochs, "teacher_s": teacher_s, "fit_s": fit_s,
            "token_tier": model.token_tier, **rec.state["cached"]}  # fmt: skip


def per_epoch(rec: Recorder, s: dict[str, Any]) -> dict[str, Any]:
    """The official loop (pre-processing + teacher on every batch of every epoch)."""
    images, epochs = _images(s, rec), s["per_epoch_epochs"]
    model = paper_model(s, "fp32", rec.device, epochs=epochs)
    _, seconds = clock(lambda: model.fit(images, teacher_per_epoch=True), rec.device)
    rec.state["loop"] = {"image_epoch_s": seconds / epochs / len(images)}
    return {"images": len(images), "epochs": epochs, "seconds": seconds, **rec.state["loop"]}


def projection(rec: Recorder) -> dict[str, Any]:
    """A VisA-sized category (905 images, 50 epochs) from the per-image, per-epoch costs."""
    c, loop, n, e = rec.state["cached"], rec.state["loop"], VISA_CATEGORY, PAPER_EPOCHS
    cached_s = n * c["teacher_s_per_image"] + n * e * c["epoch_s_per_image"]
    loop_s = n * e * loop["image_epoch_s"]
    return {"images": n, "epochs": e, "cached_total_s": cached_s, "per_epoch_total_s": loop_s,
            "speedup": loop_s / cached_s, "under_a_minute": cached_s < 60}  # fmt: skip


# ------------------------------------------------------------------------------- step 4: bank
def run_bank(rec: Recorder, ctx: dict[str, Any]) -> None:
    rows, width, proj, queries = ctx["sizes"]["bank"]
    rec.check(f"features: {rows} × {width}", lambda: features(rec, rows, width))
    rec.check("coreset 10%", lambda: coreset(rec, proj), needs=["features"])
    rec.check(f"knn: {queries} queries vs {rows} rows", lambda: search(rec, queries, rows),
              needs=["features"])  # fmt: skip
    rec.check(f"knn: {queries} queries vs the 10% coreset",
              lambda: search(rec, queries, math.ceil(rows / 10)), needs=["features"])  # fmt: skip


def features(rec: Recorder, rows: int, width: int) -> dict[str, Any]:
    """Unit-norm patch-feature-like rows, made on the device (no host copy of 6 GB)."""
    gen = torch.Generator(device=rec.device).manual_seed(0)
    feats = torch.randn(rows, width, device=rec.device, generator=gen)
    rec.state["features"] = F.normalize(feats, dim=1, out=feats)
    return {"gb": rows * width * 4 / 1e9}


def coreset(rec: Recorder, proj: int) -> dict[str, Any]:
    """Greedy k-center on the projected features: a calibration run, then as many iterations
    of the full 10% as half the time left allows (and the full selection's projected time)."""
    feats = rec.state["features"]
    reduced = feats @ random_projection(feats.shape[1], proj, 0, rec.device)
    target = math.ceil(feats.shape[0] / 10)
    probe = min(target, 200)
    _, seconds = clock(lambda: greedy_coreset(reduced, probe), rec.device)
    per_iteration = seconds / probe
    n = max(probe, min(target, int(0.5 * rec.left() / per_iteration)))
    _, seconds = clock(lambda: greedy_coreset(reduced, n), rec.device)
    return {"iterations_run": n, "target": target, "ms_per_iteration": 1000 * seconds / n,
            "run_s": seconds, "projected_full_s": seconds / n * target}  # fmt: skip


def search(rec: Recorder, queries: int, rows: int) -> dict[str, Any]:
    feats = rec.state["features"]
    bank, q = feats[:rows], feats[-queries:] + 0.01
    clock(lambda: knn(q[:16], bank[:1024], 1), rec.device)  # warm-up (kernels, handles)
    _, seconds = clock(lambda: knn(q, bank, 1), rec.device)
    flop = 2 * queries * rows * q.shape[1]
    return {"ms_per_image": 1000 * seconds, "TFLOP_per_s": flop / seconds / 1e12}
