"""Students' training throughput, and a category's 50-epoch fit with cached teacher tokens vs
re-running the teacher every epoch as the official code does (same run, same images).

Both variants start from pre-processed images in memory (the official loader also decodes and
resizes every image every epoch; that cost is left out, which favours the per-epoch variant).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import machine, parser, save, sync, table

from fbft import FBFT, FBFTConfig
from fbft.core.students import Students, transfer_loss


def per_epoch_teacher_fit(model: FBFT, images: torch.Tensor) -> float:
    """The official loop: every epoch, every batch goes through the teacher, then the students."""
    cfg, device = model.config, model.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        students = Students(model.teacher.embed_dim).to(device)
    optimizer = torch.optim.Adam(students.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    sync(device)
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(images), generator=order).split(cfg.batch_size):
            f_j, f_k = model.teacher(images[idx].to(device))
            f_j, f_k = f_j.reshape(-1, f_j.shape[-1]), f_k.reshape(-1, f_k.shape[-1])
            pred_j, pred_k = students(f_j, f_k)
            loss = transfer_loss(pred_j, f_j, pred_k, f_k, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - start


def cached_fit(model: FBFT, images: torch.Tensor) -> tuple[float, float, float]:
    """Teacher once per image, then fit on the tokens: (teacher s, training s, total s)."""
    device = model.device
    sync(device)
    start = time.perf_counter()
    tokens = []
    for batch in images.split(model.config.batch_size):
        f_j, f_k = model.teacher(batch.to(device))
        tokens += zip(f_j.cpu(), f_k.cpu(), strict=True)
    sync(device)
    teacher_s = time.perf_counter() - start
    model.fit_tokens(tokens)
    sync(device)
    total = time.perf_counter() - start
    return teacher_s, total - teacher_s, total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help="default: ViT-B/14 on GPU, ViT-S/14 on CPU")
    p.add_argument("--size", type=int, default=None, help="default: 1036 on GPU, 224 on CPU")
    p.add_argument("--images", type=int, default=None, help="default: 100 on GPU, 20 on CPU")
    p.add_argument("--epochs", type=int, default=50)
    args = p.parse_args()
    torch.set_flush_denormal(True)
    gpu = torch.cuda.is_available()
    backbone = args.backbone or (
        "vit_base_patch14_reg4_dinov2" if gpu else "vit_small_patch14_reg4_dinov2"
    )
    size = args.size or (1036 if gpu else 224)
    n = args.images or (100 if gpu else 20)
    epochs = args.epochs
    if args.quick:
        backbone, size, n, epochs = "vit_small_patch14_reg4_dinov2", 56, 4, 5
    cfg = FBFTConfig(
        backbone=backbone, weights="random", image_size=size, epochs=epochs, progress=False
    )
    model = FBFT(cfg)
    rng = np.random.default_rng(0)
    raw = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    images = torch.stack([model.teacher.preprocess(r) for r in raw])
    teacher_s, train_s, cached_s = cached_fit(model, images)
    official_s = per_epoch_teacher_fit(model, images)
    tokens = n * model.teacher.grid**2
    row = {
        "backbone": backbone.split("_patch")[0]
        .replace("vit_", "ViT-")
        .replace("small", "S")
        .replace("base", "B")
        + "/14",
        "size": size,
        "images": n,
        "epochs": epochs,
        "tokens_per_epoch": tokens,
        "students_tokens_per_s": tokens * epochs / train_s,
        "cached_teacher_s": teacher_s,
        "cached_training_s": train_s,
        "cached_total_s": cached_s,
        "per_epoch_teacher_total_s": official_s,
        "speedup": official_s / cached_s,
        "teacher_passes_cached": n,
        "teacher_passes_per_epoch": n * epochs,
    }
    info = machine()
    print(f"{info['gpu'] or info['cpu']} ({info['cores']} cores)\n")
    print(table([row], list(row)))
    save("training", args, [row])


if __name__ == "__main__":
    main()
