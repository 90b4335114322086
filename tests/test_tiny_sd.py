"""scripts/make_tiny_sd.py: a tiny SD-2-format folder that loads through from_pretrained."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from scripts.make_tiny_sd import build_tiny_sd
from sd import GuidanceOptions, StableDiffusionGuidance, sds_weight

REPO = Path(__file__).resolve().parents[1]
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_size(tiny_sd_path: Path) -> None:
    index = json.loads((tiny_sd_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for name in SUBFOLDERS:
        assert (tiny_sd_path / name).is_dir(), name
        assert name in index
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_sd_path / "tokenizer" / name).is_file(), name
    size = sum(p.stat().st_size for p in tiny_sd_path.rglob("*") if p.is_file())
    assert size < 10 * 2**20, f"tiny model is {size / 2**20:.2f} MB"


def test_cli_single_core_fast_and_deterministic(tiny_sd_path: Path, tmp_path: Path) -> None:
    """The CLI on one thread builds in < 30 s a folder byte-identical to the fixture's."""
    out = tmp_path / "cli_model"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_sd.py"), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30.0, f"make_tiny_sd took {elapsed:.1f} s"
    assert _digests(out) == _digests(tiny_sd_path)


def test_loads_as_stable_diffusion_pipeline(tiny_sd_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path))
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    # Cross-attention runs on the text encoder's width.
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.in_channels == 4


def test_vae_downsamples_x8_to_4_channels(tiny_sd_path: Path) -> None:
    vae = AutoencoderKL.from_pretrained(str(tiny_sd_path), subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae.config.latent_channels == 4
    with torch.no_grad():
        latents = vae.encode(torch.rand(2, 3, 64, 48) * 2 - 1).latent_dist.mean
        decoded = vae.decode(latents).sample
    assert latents.shape == (2, 4, 8, 6)
    assert decoded.shape == (2, 3, 64, 48)


def test_unet_and_text_encoder_forward(tiny_sd_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_path), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(tiny_sd_path), subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_path), subfolder="unet")
    ids = tokenizer(["a red car", "low quality"], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = encoder(ids)[0]                                          # [2, 77, D]
        eps = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]),
                   encoder_hidden_states=emb).sample
    assert emb.shape == (2, 77, encoder.config.hidden_size)
    assert eps.shape == (2, 4, 8, 8)
    assert torch.isfinite(eps).all()


def test_tokenizer_works_with_own_vocabulary(tiny_sd_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_path), subfolder="tokenizer")
    assert tokenizer.model_max_length == 77
    vocab = json.loads((tiny_sd_path / "tokenizer" / "vocab.json").read_text())
    assert len(tokenizer) == len(vocab)
    enc = tokenizer("A red car, front view", padding="max_length", max_length=77)
    ids = enc.input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids
    # Words of the built-in corpus are single tokens; the text round-trips (lower-cased).
    tokens = tokenizer.convert_ids_to_tokens(ids[1:7])
    assert tokens[:3] == ["a</w>", "red</w>", "car</w>"]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == \
        "a red car, front view"
    # Text outside the corpus still tokenizes (byte-level fallback), different prompts differ.
    other = tokenizer("zebra xylophone 42").input_ids
    assert tokenizer.unk_token_id not in other[1:-1]
    assert other != tokenizer("zebra xylophone 43").input_ids


def test_scheduler_matches_sd2_base(tiny_sd_path: Path) -> None:
    scheduler = DDPMScheduler.from_pretrained(str(tiny_sd_path), subfolder="scheduler")
    cfg = scheduler.config
    assert cfg.num_train_timesteps == 1000
    assert cfg.beta_schedule == "scaled_linear"
    assert (cfg.beta_start, cfg.beta_end) == (0.00085, 0.012)
    assert cfg.prediction_type == "epsilon"
    # scaled_linear: betas linear in sqrt space.
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-5, atol=0)


def test_zero_output_model_gives_pure_noise_sds_gradient(tmp_path: Path) -> None:
    """--zero-output: eps_hat = 0 for every input, so the SDS gradient is exactly w(t) * (-noise)
    (zero mean); everything else about the model is the same build."""
    path = build_tiny_sd(tmp_path / "zero", zero_output=True)
    sd = StableDiffusionGuidance(GuidanceOptions(sd_model=str(path), text="a cup", guidance_weight=50.0,
                                                 image_resolution=64), "cpu")
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    result = sd.sds(latents, "geometry_coarse", it=1, generator=gen)
    result.loss.backward()
    # Replay the draws in sds()'s documented order (t, then noise) to know the noise it used.
    replay = torch.Generator().manual_seed(0)
    t = torch.randint(int(1000 * 0.02), int(1000 * 0.5) + 1, (2,), generator=replay)
    torch.testing.assert_close(result.t, t)
    noise = torch.randn(latents.shape, generator=replay)
    a = sd.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * latents.detach() + (1.0 - a).sqrt() * noise
    emb = sd.text_embeddings(None, 2)
    assert sd.predict_eps(z_t, t, emb).abs().max() == 0
    w = sds_weight(sd.alphas_cumprod, t, "geometry_coarse", 0, 1, 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(latents.grad, -w * noise)
