"""The OFT paper's published figures that the tables compare with (../shared/BRIEF.md;
SD 1.5, full size, GPU). Said once here; the tables' notes and table=claims read them."""

from __future__ import annotations

# Table 2, control consistency per method (SD = the base model without control). Canny IoU and
# seg mIoU: higher is better; landmark error (px): lower is better. The paper has no depth column.
TABLE2 = {
    "canny": {"sd": 0.049, "controlnet": 0.189, "t2i_adapter": 0.078, "lora": 0.168, "coft": 0.195, "oft": 0.193},
    "seg": {"sd": 7.72, "controlnet": 20.88, "t2i_adapter": 16.38, "lora": 22.98, "coft": 26.92, "oft": 27.06},
    "landmarks": {"sd": 146.19, "controlnet": 7.61, "t2i_adapter": 23.75, "lora": 7.68, "coft": 6.92, "oft": 7.07},
}
TABLE2_METRIC = {"canny": "Canny IoU", "seg": "mIoU (%)", "landmarks": "landmark error (px)"}

# The segmentation ablation over the block count r (ADE20K mIoU, %).
R_ABLATION_MIOU = {2: 27.18, 4: 27.06, 8: 24.09, 16: 21.0}

CONVERGENCE = ("LoRA needs 20 epochs to reach OFT's 8th-epoch landmark error; ControlNet's control appears "
               "suddenly after epoch 8; OFT reaches its level with 5 % of ADE20K")
ENERGY = "OFT/COFT keep every layer's hyperspherical energy (by construction); LoRA and full finetuning do not"
STABILITY = "COFT's constraint makes finetuning more stable than OFT's (qualitative; no figure in the brief)"
