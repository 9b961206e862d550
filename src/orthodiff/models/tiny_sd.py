"""The embedded tiny Stable Diffusion: architecture, tokenizer, and the shipped folder.

Same classes and folder layout as Stable Diffusion (diffusers' StableDiffusionPipeline
loads it unchanged), scaled down for 64x64 shapes-world images on a CPU:
an f=4 AutoencoderKL (64x64x3 <-> 16x16x4), a small CLIP text encoder over the real
CLIP BPE vocabulary, and a three-level UNet2DConditionModel.
"""

import gzip
import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[3] / "assets"
TINY_SD_PATH = ASSETS / "tiny-sd"

# SD's noise schedule (scaled_linear 0.00085 -> 0.012 over 1000 steps), v-prediction as in SD 2.x.
SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", clip_sample=False,
)


def build_vae(channels=(16, 32, 64), latent_channels=4, norm_num_groups=16, layers_per_block=1) -> AutoencoderKL:
    """f = 2^(len(channels)-1) = 4. No mid-block attention: not needed at 16x16 for flat shapes.

    The defaults are recipe v2's (the shipped VAE). There 16 groups on the 16-channel
    full-resolution level make GroupNorm a per-channel instance norm, the setting in which
    a decoder learns to plant a bright spike to steer the normalization statistics of a
    flat image (StyleGAN's "droplet"): v2's spots. Fewer groups put several channels in
    each group."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels), layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
        sample_size=64, mid_block_add_attention=False,
    )


def build_text_encoder(hidden=64, layers=3, heads=4, vocab_size=49408) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def build_unet(channels=(64, 96, 96), cross_attention_dim=64, attention_heads=2, sample_size=16,
               latent_channels=4, norm_num_groups=32) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # diffusers' UNet reads `attention_head_dim` as the number of heads (SD 1.5's 8 = 8 heads).
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_heads, norm_num_groups=norm_num_groups,
    )


def width_tag(width: float) -> str:
    """The width ladder's spelling of a UNet width: 0.5 -> "05", 2 -> "2" (model=tiny_w05, tiny-sd-w2)."""
    return f"{width:g}".replace(".", "")


LADDER_RUNG = re.compile(r"tiny-sd-w(05|2)")  # the folder names scripts/pretrain_tiny_sd.py unet_width=0.5|2 writes


def is_ladder_rung(path: Path) -> bool:
    return LADDER_RUNG.fullmatch(path.name) is not None


def missing_model_message(path: Path) -> str:
    """What to say when a rung of the width ladder (tiny-sd-w05, tiny-sd-w2) is absent: the
    command that builds it."""
    width = {"05": "0.5", "2": "2"}[LADDER_RUNG.fullmatch(path.name).group(1)]
    return (f"the width ladder's {width}x tiny SD is not built yet ({path} does not exist): build it with "
            f"`python scripts/pretrain_tiny_sd.py unet_width={width}` (resumable; hours on a CPU core)")


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character table (GPT-2/CLIP format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_clip_tokenizer(bpe_gz: Path, out_dir: Path) -> CLIPTokenizer:
    """Write CLIP's tokenizer (vocab.json, merges.txt, tokenizer.json) from its BPE merges file.

    `bpe_gz` is `bpe_simple_vocab_16e6.txt.gz`, shipped in the open_clip_torch wheel (MIT).
    CLIP's vocabulary is, in order: the 256 byte symbols, the same with '</w>', the
    first 48894 merges joined, then <|startoftext|> and <|endoftext|>: 49408 tokens.
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [m for m in lines[1 : 49152 - 256 - 2 + 1] if m]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tiny_sd(path: Path | str = TINY_SD_PATH, dtype=torch.float32):
    """The shipped pipeline, through diffusers' own loader."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no diffusers pipeline at {path} (model_index.json missing); the tiny model is made by "
            "`python scripts/pretrain_tiny_sd.py`"
        )
    return StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
