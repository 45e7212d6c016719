"""Step 1 of the device check: every CUDA branch against the CPU (or, on a CPU, against itself).

On CUDA: the same fit and maps on CPU float32 vs CUDA float32; bf16 and fp16 autocast vs CUDA
float32 (metric differences on held-out synthetic defects); the token store's device, pinned
host and memmap tiers (students bit-equal; CUDA synchronisations of the device-tier training
counted); exact kNN and greedy coreset on the GPU vs the CPU (and sync-free on the GPU);
``fbft predict --device cuda`` vs the CPU model's scores. On a CPU (``--device cpu``) the same
code compares CPU with CPU, where every result must be identical.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from device_record import Recorder, count_syncs, rel_diff, students_rel_diff, verdict

from fbft import FBFT, FBFTConfig
from fbft.core.tokens import TokenStore
from fbft.data import open_dataset
from fbft.data.synthetic import generate
from fbft.detectors.neighbours import greedy_coreset, knn
from fbft.metrics import evaluate

CATEGORY = "gravel"
METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_5")
# Stated tolerances on CUDA (on a CPU every comparison must be exactly 0). CPU vs CUDA float32
# differ by summation order (and the patch-embedding convolution, which cuDNN runs in TF32 by
# default); autocast changes the teacher's tokens by ~1e-2 relative.
TOL = {"fp32": 2e-3, "autocast_metric": 0.02, "knn_distance": 1e-4, "predict": 2e-3}


def run(rec: Recorder, ctx: dict[str, Any]) -> None:
    dev, size = rec.device, ctx["sizes"]
    cpu = dev.type == "cpu"
    rec.check("device", lambda: device_properties(dev))
    rec.check("data", lambda: load_data(rec, ctx))
    rec.check(f"fit + maps: cpu fp32 vs {dev} fp32", lambda: fit_vs_cpu(rec, ctx), needs=["data"])
    for precision in ("fp32",) if cpu else ("bf16", "fp16"):
        label = f"autocast {precision} vs fp32" + (" (self-check)" if cpu else "")
        rec.check(label, lambda p=precision: autocast(rec, ctx, p), needs=["dev"])
    rec.check("token tiers: device / host / memmap", lambda: tiers(rec, ctx), needs=["dev"])
    rec.check(f"knn + coreset: {dev} vs cpu", lambda: neighbours(dev, size), estimate_s=1)
    rec.check(f"fbft predict --device {dev} vs cpu", lambda: predict_cli(rec, ctx), needs=["ref"])


def device_properties(dev: torch.device) -> dict[str, Any]:
    if dev.type != "cuda":
        return {"torch_threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(dev)
    return {
        "name": p.name,
        "memory_gb": p.total_memory / 1e9,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_fp32_precision": torch.get_float32_matmul_precision(),
        "cudnn_conv_fp32_precision": str(torch.backends.cudnn.conv.fp32_precision),
    }


def config(ctx: dict[str, Any], **changes: Any) -> FBFTConfig:
    return FBFTConfig(weights="random", progress=False, **{**ctx["sizes"]["model"], **changes})


def load_data(rec: Recorder, ctx: dict[str, Any]) -> dict[str, Any]:
    s = ctx["sizes"]
    root = generate(Path(ctx["work"]) / "data", [CATEGORY], image_size=s["data_size"],
                    n_train=s["n_train"], n_test=s["n_test"], seed=0)  # fmt: skip
    train, test = (open_dataset(root, CATEGORY, split) for split in ("train", "test"))
    rec.state["data"] = {
        "train": [x.image for x in train],
        "test": [x.image for x in test],
        "masks": [x.mask for x in test],
        "paths": [x.path for x in test],
    }
    return {"train": len(train), "test": len(test), "defective": sum(x.label for x in test)}


def fit_predict(cfg: FBFTConfig, data: dict[str, Any]) -> tuple[FBFT, list, list, dict]:
    model = FBFT(cfg).fit(data["train"])
    maps, scores = model.predict(data["test"])
    return model, maps, scores, evaluate(maps, data["masks"], scores=scores)


def fit_vs_cpu(rec: Recorder, ctx: dict[str, Any]) -> dict[str, Any]:
    data = rec.state["data"]
    ref = fit_predict(config(ctx, device="cpu"), data)
    other = fit_predict(config(ctx, device=str(rec.device)), data)
    rec.state["ref"], rec.state["dev"] = ref, other
    values = {
        "students_rel_diff": students_rel_diff(ref[0], other[0]),
        "maps_rel_diff": rel_diff(ref[1], other[1]),
        "scores_rel_diff": rel_diff([ref[2]], [other[2]]),
        **{f"{k}_diff": abs(other[3][k] - ref[3][k]) for k in METRICS},
    }
    keys = ["students_rel_diff", "maps_rel_diff", "scores_rel_diff"]
    return verdict(values, keys, 0.0 if rec.device.type == "cpu" else TOL["fp32"])


def autocast(rec: Recorder, ctx: dict[str, Any], precision: str) -> dict[str, Any]:
    data, (base, _, _, base_metrics) = rec.state["data"], rec.state["dev"]
    model, _, _, metrics = fit_predict(
        config(ctx, device=str(rec.device), precision=precision), data
    )
    sample = data["test"][:4]
    ours, theirs = (m.teacher.encode(sample, m.config.batch_size) for m in (base, model))
    tokens = rel_diff([t[1] for t in ours], [t[1] for t in theirs])
    values = {"tokens_rel_diff": tokens, **{f"{k}_diff": abs(metrics[k] - base_metrics[k])
                                            for k in METRICS}}  # fmt: skip
    values.update({k: metrics[k] for k in METRICS})
    cpu = rec.device.type == "cpu"
    return verdict(values, [f"{k}_diff" for k in METRICS], 0.0 if cpu else TOL["autocast_metric"])


def tiers(rec: Recorder, ctx: dict[str, Any]) -> dict[str, Any]:
    """The same tokens from each tier: students bit-equal (same values, same arithmetic)."""
    base = rec.state["dev"][0]
    cfg = config(ctx, device=str(rec.device))
    tokens = base.teacher.encode(rec.state["data"]["train"], base.config.batch_size)
    stores = {"device": TokenStore.of(tokens, rec.device, None)}
    host = TokenStore(rec.device, None)
    host.budget = {"device": 0, "host": 1 << 62}  # no device room: every image in (pinned) host
    for f_j, f_k in tokens:
        host.add(f_j, f_k)
    stores["host"] = host
    with tempfile.TemporaryDirectory(prefix="fbft-dc-") as folder:
        mapped = []
        for i, (f_j, f_k) in enumerate(tokens):
            np.save(f"{folder}/{i}.npy", np.stack([f_j.numpy(), f_k.numpy()]))
            pair = np.load(f"{folder}/{i}.npy", mmap_mode="r")
            mapped.append((pair[0], pair[1]))
        stores["memmap"] = TokenStore.of(mapped, rec.device, None)
        models, syncs = {}, {}
        for name, store in stores.items():
            with store:  # FBFT._train: the fit on a given store (fit_tokens builds its own)
                model = FBFT(cfg, teacher=base.teacher)
                fit = functools.partial(model._train, store)
                models[name], syncs[name] = count_syncs(fit, rec.device)
    first = models["device"]
    values: dict[str, Any] = {f"{n}_tier": m.token_tier for n, m in models.items()}
    values.update({f"{n}_students_diff": students_rel_diff(first, m) for n, m in models.items()})
    values["cuda_syncs"] = syncs if rec.device.type == "cuda" else None
    values["epochs"] = cfg.epochs
    return verdict(values, [f"{n}_students_diff" for n in models], 0.0)


def neighbours(dev: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """Exact kNN (k = 9) and greedy coreset on ``dev`` with small blocks vs the CPU with the
    default blocks; distances within a tolerance, indices equal wherever the order is not a
    near-tie, no CUDA synchronisation inside either loop."""
    rows, queries, width = size["knn"]
    gen = torch.Generator().manual_seed(0)
    bank, q = torch.randn(rows, width, generator=gen), torch.randn(queries, width, generator=gen)
    ref_d, ref_i = knn(q, bank, k=9)
    small = rows * min(queries, 4096) // 5  # five bank blocks per query block: merges run
    bank_dev, q_dev = bank.to(dev), q.to(dev)
    (d, i), knn_syncs = count_syncs(lambda: knn(q_dev, bank_dev, k=9, chunk=small), dev)
    d, i = d.cpu(), i.cpu()
    scale = float(ref_d.max())
    gaps = torch.cat([ref_d[:, 1:] - ref_d[:, :-1], torch.full((queries, 1), scale)], 1)
    clear = gaps > TOL["knn_distance"] * scale  # rank r is not tied with rank r + 1
    clear[:, 1:] &= clear[:, :-1].clone()  # nor any rank before it
    n = size["coreset"]
    ref_c = greedy_coreset(bank, n, start=0)
    c, coreset_syncs = count_syncs(lambda: greedy_coreset(bank_dev, n, 0, chunk=4096), dev)
    c = c.cpu()
    same = (c == ref_c).int().cumprod(0).sum()
    values = {
        "knn_distance_rel_diff": float((d - ref_d).abs().max()) / scale,
        "knn_index_mismatches": int((i != ref_i)[clear].sum()),
        "knn_ranks_compared": int(clear.sum()),
        "coreset_equal_prefix": int(same),
        "coreset_size": n,
        "coreset_mismatches": n - int(same),
        "knn_cuda_syncs": knn_syncs,
        "coreset_cuda_syncs": coreset_syncs,
    }
    zero = ["knn_index_mismatches", "coreset_mismatches"]
    if dev.type == "cuda":
        zero += ["knn_cuda_syncs", "coreset_cuda_syncs"]
    out = verdict(values, ["knn_distance_rel_diff"], TOL["knn_distance"])
    out["ok"] = out["ok"] and all(values[k] == 0 for k in zero)
    return out


def predict_cli(rec: Recorder, ctx: dict[str, Any]) -> dict[str, Any]:
    """`fbft predict --device DEV` on the saved CPU-trained model vs its in-process CPU scores."""
    import pandas as pd

    from fbft.cli import main as fbft_main

    ref, data = rec.state["ref"], rec.state["data"]
    work = Path(ctx["work"])
    model_path = ref[0].save(work / "model.pt")
    argv = ["predict", *map(str, data["paths"]), "--model", str(model_path), "--out",
            str(work / "predicted"), "--device", str(rec.device), "--batch-size",
            str(ref[0].config.batch_size), "--no-overlays"]  # fmt: skip
    if fbft_main(argv) != 0:
        raise RuntimeError(f"fbft {' '.join(argv)} failed")
    table = pd.read_csv(work / "predicted" / "scores.csv")
    paths = [str(Path(p).resolve()) for p in table["path"]]
    got = dict(zip(paths, table["score"], strict=True))
    scores = [got[str(Path(p).resolve())] for p in data["paths"]]
    values = {"images": len(scores), "scores_rel_diff": rel_diff([ref[2]], [scores])}
    cpu = rec.device.type == "cpu"
    return verdict(values, ["scores_rel_diff"], 1e-6 if cpu else TOL["predict"])
