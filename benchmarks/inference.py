"""Per-image inference time of FBFT by stage: teacher, students, maps, and end to end.

Stage times come from the model's own ``FBFT.predict_detailed`` (``Prediction.seconds``: teacher,
students, maps; CUDA-synchronised), medians after warm-up; the CPU pre-processing (pad + bicubic
resize of a 1500×1500 image) is reported apart, and end to end (``FBFT.predict``) includes it.
Maps are made at 1500×1500, a VisA image. Teachers are random-init (same FLOPs as pretrained;
denormals flushed on the CPU, as pretrained weights do not produce them). FLOPs are counted
with torch.utils.flop_counter; MFU = (teacher + students FLOPs) / their time / the device's peak.
"""

from __future__ import annotations

import numpy as np
import torch
from common import machine, parser, save, table, timed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fbft import FBFT, FBFTConfig

ORIGINAL = 1500
BACKBONES = {
    "ViT-S/14": "vit_small_patch14_reg4_dinov2",
    "ViT-B/14": "vit_base_patch14_reg4_dinov2",
}
# Dense peak FLOP/s by GPU name and precision (vendor datasheets, no sparsity).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "4090": {"bf16": 165e12, "fp32": 82.6e12},
}


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """The device's peak FLOP/s and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[precision], f"{key} datasheet ({precision}, dense)"
        return float("nan"), f"unknown GPU {name}"
    a = torch.randn(2048, 2048)
    seconds = timed(lambda: a @ a, device, warmup=2, repeat=5)
    return 2 * 2048**3 / seconds, "measured fp32 GEMM (2048³) on this CPU"


def model_for(backbone: str, size: int, precision: str, batch: int, device: torch.device) -> FBFT:
    cfg = FBFTConfig(
        backbone=backbone, weights="random", image_size=size, device=str(device),
        precision=precision, epochs=1, batch_size=batch, progress=False,
    )  # fmt: skip
    model = FBFT(cfg)
    grid = (size // 14) ** 2
    zeros = torch.zeros(grid, model.teacher.embed_dim)
    return model.fit_tokens([(zeros, zeros)])  # students' cost does not depend on training


def flops(model: FBFT, batch: int, device: torch.device) -> tuple[float, float]:
    """(teacher, students) FLOPs per image, attention counted (math SDPA kernel)."""
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        f_j, f_k = model.teacher(x)
    teacher = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.students(f_j, f_k)
    return teacher / batch, counter.get_total_flops() / batch


def stages(model: FBFT, batch: int, device: torch.device, quick: bool) -> dict[str, float]:
    """Per-image ms by stage from the model's own :meth:`FBFT.predict_detailed` (one batch of
    ``batch`` 1500×1500 images), medians over repeats after warm-up."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (ORIGINAL, ORIGINAL, 3), dtype=np.uint8) for _ in range(batch)]
    warmup, repeat = (1, 2 if quick else 3) if device.type == "cpu" else (5, 20)
    for _ in range(warmup):
        model.predict_detailed(images)
    runs = [model.predict_detailed(images).seconds for _ in range(repeat)]
    out = {
        f"{stage}_ms": 1000 * float(np.median([r[stage] for r in runs])) / batch
        for stage in ("teacher", "students", "maps")
    }
    out["preprocess_ms"] = 1000 * timed(
        lambda: model.teacher.preprocess(images[0]), device, 1, repeat
    )
    out["end_to_end_ms"] = 1000 * timed(lambda: model.predict(images), device, 1, repeat) / batch
    teacher_flops, student_flops = flops(model, batch, device)
    out["teacher_GFLOP"], out["students_GFLOP"] = teacher_flops / 1e9, student_flops / 1e9
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 518, 1036])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)
    cpu = device.type == "cpu"
    if args.quick:
        plan = [("ViT-S/14", 224, "fp32", 1)]
    else:
        precisions = ["fp32"] if cpu else ["fp32", "bf16"]
        plan = [
            (name, size, precision, batch)
            for name in args.backbones
            for size in args.sizes
            for precision in precisions
            for batch in ([1, 4] if cpu and size <= 518 else [1] if cpu else [1, 8])
        ]
    peaks = {pr: peak_flops(device, pr) for pr in {p[2] for p in plan}}
    rows = []
    for name, size, precision, batch in plan:
        model = model_for(BACKBONES[name], size, precision, batch, device)
        row = {"backbone": name, "size": size, "precision": precision, "batch": batch}
        row.update(stages(model, batch, device, args.quick))
        flops = (row["teacher_GFLOP"] + row["students_GFLOP"]) * 1e9
        busy = (row["teacher_ms"] + row["students_ms"]) / 1000
        row["MFU_%"] = 100 * flops / busy / peaks[precision][0]
        row["images_per_s"] = 1000 / row["end_to_end_ms"]
        rows.append(row)
        print(table([row], list(row)), flush=True)
        del model
    info = machine()
    where = info["gpu"] or f"{info['cpu']} ({info['cores']} cores)"
    print(
        f"\n{where}; peak: "
        + "; ".join(f"{k}: {v[0] / 1e12:.3g} TFLOP/s, {v[1]}" for k, v in peaks.items())
    )
    columns = ["backbone", "size", "precision", "batch", "preprocess_ms", "teacher_ms",
               "students_ms", "maps_ms", "end_to_end_ms", "images_per_s", "teacher_GFLOP",
               "students_GFLOP", "MFU_%"]  # fmt: skip
    print(table(rows, columns))
    save(
        "inference",
        args,
        rows,
        peaks={k: {"flops": v[0], "source": v[1]} for k, v in peaks.items()},
    )


if __name__ == "__main__":
    main()
