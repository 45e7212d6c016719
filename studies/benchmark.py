"""The paper's main results (Tables 1 and 2) and its comparison with PatchCore and SPADE on the
same DINOv2 tokens (Table 6): full training sets, every method × input size.

Columns: I-AUROC, AUPRO@30%, AUPRO@5%, AUPRO@5% per cumulative defect-size quartile Q1..Q4,
ρ@30% and ρ@5%, and inference milliseconds per image (students + maps, plus the teacher). One
teacher pass per image serves every method: the feature cache is shared. With several
``--data`` roots, run the script once per dataset (one table each).
"""

from fbft.detectors import methods
from fbft.study import Axis, Study, main, method

COLUMNS = {
    "i_auroc": "I-AUROC",
    "aupro_30": "AUPRO@30%",
    "aupro_5": "AUPRO@5%",
    **{f"aupro_5_q{i}": f"Q{i}@5%" for i in range(1, 5)},
    "rho_30": "ρ@30%",
    "rho_5": "ρ@5%",
    "time/inference_ms": "ms/image",
    "time/fit_seconds": "fit s",
}

STUDY = Study(
    name="benchmark",
    title="Main results: methods × input size (full training sets)",
    axes=(
        Axis("method", "--methods", methods(), "detectors to compare", method),
        Axis("image_size", "--sizes", (224, 1036), "teacher input sides in pixels", int),
    ),
    columns=COLUMNS,
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
