"""Write a tiny, randomly initialised Stable-Diffusion-2-format model folder.

Usage: ``python scripts/make_tiny_sd.py OUT_DIR`` (or ``build_tiny_sd(out_dir)`` from Python).
``--full-size`` writes the SD 2.1-base architecture instead (865M-parameter UNet, 84M VAE, 23-layer
1024-wide text encoder; random weights, fp16 files, ~2.6 GB): it measures speed and memory on a
GPU exactly as the real weights would, without downloading them. ``--zero-output`` zeroes the UNet's
last convolution (eps_hat = 0, so the SDS gradient is zero-mean noise) at identical compute.

The folder has the StableDiffusionPipeline layout (``model_index.json`` + ``unet/ vae/
text_encoder/ tokenizer/ scheduler/``) and loads through the real ``from_pretrained`` code paths of
diffusers and transformers, so tests exercise exactly the loading code that real weights use.
What is kept faithful to SD 2.x-base, because the guidance code depends on it:

- VAE: 4 encoder blocks -> 3 downsamplings (x8 spatial), 4 latent channels, scaling 0.18215.
- UNet: epsilon prediction, cross-attention width = text encoder width, linear projections.
- Text encoder: CLIP, 77 positions; tokenizer: byte-level BPE CLIP tokenizer with its own small
  vocabulary/merges (learned here from a fixed word list), pad token "!" as SD 2.
- Scheduler: DDPM, 1000 train steps, scaled_linear betas 0.00085..0.012.

Everything else is shrunk so the folder is < 10 MB and builds in seconds on one core. Weights come
from a fixed seed, so two builds produce byte-identical files.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

SEED = 0
TEXT_WIDTH = 32          # text encoder hidden size == UNet cross-attention width
MAX_LENGTH = 77          # CLIP context length, as SD
NUM_MERGES = 400         # BPE merges learned from CORPUS (upper bound)
LATENT_CHANNELS = 4
SCALING_FACTOR = 0.18215

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"

# Words the tests and typical prompts use; the BPE merges are learned from these so that common
# words become single tokens (any other text still tokenizes, byte by byte).
CORPUS = """
a an the of and with in on photo photograph portrait render rendering view front side back
low quality high detailed realistic unrealistic shadow oversaturated color strange dslr
red green blue yellow white black golden wooden metal car chair table dog cat horse bird
house castle tree flower cake lamp robot knight astronaut batman einstein gundam statue
head body toy shoe cup vase teapot hamburger pineapple sofa bed 3d model cartoon
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (the byte-level BPE alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the corpus words (CLIP style: last symbol carries the '</w>' suffix)."""
    byte_map = _bytes_to_unicode()
    freqs = collections.Counter(re.findall(r"[a-z0-9]+", corpus.lower()))
    words: dict[tuple[str, ...], int] = {}
    for word, n in sorted(freqs.items()):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] = n
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        # Most frequent pair, ties broken lexicographically so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge_pair(symbols, best): n for symbols, n in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tokenizer(out_dir: Path) -> int:
    """Write vocab.json/merges.txt/tokenizer_config.json; returns the vocabulary size.

    Vocabulary order follows CLIP: 256 byte symbols, the same with '</w>', merged tokens, then
    the special tokens (so "!" is id 0, which SD 2 uses as pad token).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(CORPUS, NUM_MERGES)
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2),
                                                     encoding="utf-8")
    return len(vocab)


# Architecture sizes: the tiny test model, and SD 2.1-base (the published configs of
# stabilityai/stable-diffusion-2-1-base, vocabulary aside: ours has its own small tokenizer).
TINY = {"vae_blocks": (8, 16, 16, 16), "vae_layers": 1, "vae_groups": 4,
        "unet_down": ("CrossAttnDownBlock2D", "DownBlock2D"), "unet_up": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "unet_blocks": (32, 64), "unet_layers": 1, "unet_groups": 8, "unet_heads": (2, 4),
        "text_width": TEXT_WIDTH, "text_ffn": 2 * TEXT_WIDTH, "text_layers": 2, "text_heads": 4,
        "text_proj": TEXT_WIDTH}
SD21_BASE = {"vae_blocks": (128, 256, 512, 512), "vae_layers": 2, "vae_groups": 32,
             "unet_down": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "unet_up": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             "unet_blocks": (320, 640, 1280, 1280), "unet_layers": 2, "unet_groups": 32,
             "unet_heads": (5, 10, 20, 20), "text_width": 1024, "text_ffn": 4096, "text_layers": 23,
             "text_heads": 16, "text_proj": 512}


def vae_model(arch: dict) -> AutoencoderKL:
    """The VAE of `arch` (TINY or SD21_BASE), weights from the fixed seed."""
    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        # 4 blocks: every block but the last downsamples -> x8, as the real SD VAE.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=arch["vae_blocks"], layers_per_block=arch["vae_layers"],
        norm_num_groups=arch["vae_groups"],
        latent_channels=LATENT_CHANNELS, sample_size=512, scaling_factor=SCALING_FACTOR,
    )


def unet_model(arch: dict) -> UNet2DConditionModel:
    """The UNet of `arch` (TINY or SD21_BASE), weights from the fixed seed."""
    torch.manual_seed(SEED)
    return UNet2DConditionModel(
        sample_size=64, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=arch["unet_down"], up_block_types=arch["unet_up"],
        block_out_channels=arch["unet_blocks"], layers_per_block=arch["unet_layers"],
        norm_num_groups=arch["unet_groups"],
        cross_attention_dim=arch["text_width"], attention_head_dim=arch["unet_heads"],
        use_linear_projection=True,  # as SD 2.x
    )


def _text_encoder(vocab_size: int, token_ids: dict[str, int], arch: dict):
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch["text_width"], intermediate_size=arch["text_ffn"],
        projection_dim=arch["text_proj"], num_hidden_layers=arch["text_layers"],
        num_attention_heads=arch["text_heads"],
        max_position_embeddings=MAX_LENGTH, hidden_act="gelu",
        bos_token_id=token_ids[BOS], eos_token_id=token_ids[EOS], pad_token_id=token_ids[PAD],
    )
    torch.manual_seed(SEED)
    return CLIPTextModel(config)


def _scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False,
                         prediction_type="epsilon", steps_offset=1)


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sd(out_dir: str | Path, full_size: bool = False, zero_output: bool = False) -> Path:
    """Build the tiny model (or, with ``full_size``, the SD 2.1-base architecture) into
    ``out_dir`` (created if needed) and return its path.

    ``zero_output`` zeroes the UNet's last convolution, so it predicts eps_hat = 0 for every input
    (see ``--zero-output``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"make_tiny_sd: OUT_DIR {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out / "tokenizer")
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    arch = SD21_BASE if full_size else TINY
    # Full size is stored in fp16 (as the real weights are used on GPU): half the disk and time.
    dtype = torch.float16 if full_size else torch.float32
    _text_encoder(vocab_size, vocab, arch).to(dtype).save_pretrained(out / "text_encoder")
    vae_model(arch).to(dtype).save_pretrained(out / "vae")
    unet = unet_model(arch)
    if zero_output:
        with torch.no_grad():
            unet.conv_out.weight.zero_()
            unet.conv_out.bias.zero_()
    unet.to(dtype).save_pretrained(out / "unet")
    _scheduler().save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2, sort_keys=True)
                                          + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny diffusers model into")
    parser.add_argument("--full-size", action="store_true",
                        help="SD 2.1-base architecture with random weights (for GPU speed/memory runs)")
    parser.add_argument("--zero-output", action="store_true",
                        help="zero the UNet's last convolution: eps_hat = 0, so the SDS gradient is "
                             "w(t) * (-noise), unbiased noise. Random weights otherwise give a fixed, "
                             "biased score that empties a shape within ~20 iterations; with this a "
                             "random-weight run keeps its surface for a few hundred (timing, scaling, "
                             "export checks). No random model carries signal: quality runs use "
                             "guidance=target_mesh")
    args = parser.parse_args(argv)
    path = build_tiny_sd(args.out_dir, full_size=args.full_size, zero_output=args.zero_output)
    size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    kind = "SD 2.1-base-sized (random weights)" if args.full_size else "tiny"
    print(f"{kind} Stable Diffusion model written to {path} ({size_mb:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
