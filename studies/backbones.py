"""Teacher backbones (Table 5): an ImageNet ViT-B/16 against DINOv2 at two input sizes.

Each ``--backbones`` value is ``timm_name@input_side``. The official code normalises every
backbone with ImageNet's mean and std (``FBFTConfig.normalize="imagenet"``, the default).
"""

from fbft.study import Axis, Study, backbone_at_size, backbone_changes, main

STUDY = Study(
    name="backbones",
    title="Teacher backbones",
    axes=(
        Axis(
            "backbone",
            "--backbones",
            (
                "vit_base_patch16_224.augreg_in21k_ft_in1k@224",
                "vit_base_patch14_reg4_dinov2.lvd142m@224",
                "vit_base_patch14_reg4_dinov2.lvd142m@1036",
            ),
            "timm_name@input_side",
            backbone_at_size,
            backbone_changes,
        ),
    ),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
