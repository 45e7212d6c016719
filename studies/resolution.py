"""Teacher input resolution, with evaluation at the ground truth's full resolution (Table 8)."""

from fbft.study import Axis, Study, main

STUDY = Study(
    name="resolution",
    title="Input resolution (maps upsampled to the original ground truth)",
    axes=(Axis("image_size", "--sizes", (224, 518, 1036), "teacher input sides in pixels", int),),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
