"""Guidance options against multi-face (Janus) shapes: Perp-Neg and view-dependent prompt debiasing.

Formulas are recomputed here from the config keys' documentation (docs/CONFIG.md, perp_neg,
perp_neg_decay, prompt_debias) in float64 and plain Python, independently of sd.py: the
perpendicular component, the per-view weights and blends, the guided noise for a fake UNet, and
the debiasing's probabilities and drop decisions on a tiny random masked language model built here.
With both options off the guidance is bit-identical to plain classifier-free guidance. Short
tiny-model runs train both phases with Perp-Neg on.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, CLIPTextModel, CLIPTokenizer

import sd
from geometry.dmtet import DMTetGeometry
from geometry.sdf_init import pretrain_sdf
from model_files import InvalidModelFolderError, ModelNotFoundError, resolve_masked_lm
from sd import (DEBIAS_VIEWS, PERP_NEG_DECAY, CudaGraphUNet, GuidanceOptions, GuidanceOptionsError,
                PromptDebiasError, StableDiffusionGuidance, debias_prompt, perp_neg_eps, perp_neg_views,
                perpendicular, view_word_ids)
from tests.run_helpers import read_log, run_train, write_config
from tests.test_train_appearance import write_textured_egg

TEXT = "a smiling dog with a red hat"
SCALE = 7.5
RES = 64                 # VAE input size (latents 8x8)
VIEWS = ("front", "side", "back", "side")

# The short runs use one process and a loose SDF start on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:each optimizer step draws cameras"),
              pytest.mark.filterwarnings("ignore:SDF pretraining ended")]

# The published decay values, spelled out once more: (a, b, c) of w = -(a exp(-b x) + c).
FRONT_IN_FS, SIDE_IN_FS, SIDE_IN_SB, FRONT_IN_SB = (4, 0.5, -2.426), (4, 0.5, -2.426), (1, 0.5, -0.606), (1, 0.5, 0.967)

# A tiny BERT vocabulary: the special tokens, the debiasing sentence, the view words and the prompt.
MLM_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "this", "image", "is", "depicting", "a", "view", "of",
             "front", "side", "back", "smiling", "dog", "with", "red", "hat", ","]


# --------------------------------------------------------------------------- references


def ref_perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x - (<x, y> / max(<y, y>, 1e-6)) y per sample, in float64 over flattened samples."""
    out = []
    for xs, ys in zip(x.double().flatten(1), y.double().flatten(1)):
        coef = float(xs @ ys) / max(float(ys @ ys), 1e-6)
        out.append(xs - coef * ys)
    return torch.stack(out).view(x.shape)


def ref_views(azimuth_deg: float) -> tuple[str, float, tuple[float, float]]:
    """(region, r, (w1, w2)) for one azimuth in degrees, from the perp_neg key's text."""
    d = abs((azimuth_deg + 180.0) % 360.0 - 180.0)

    def w(abc, x):
        return -(abc[0] * math.exp(-abc[1] * x) + abc[2])

    if d < 90:
        r = 1 - d / 90
        return "front_side", r, (w(FRONT_IN_FS, r), w(SIDE_IN_FS, 1 - r))
    r = max(0.0, 2 - d / 90)
    return "side_back", r, (w(SIDE_IN_SB, r), w(FRONT_IN_SB, r))


def fake_unet(calls: list[int]):
    """A stand-in UNet whose output depends on every row's sample, time step and embedding."""
    def run(sample: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        calls.append(sample.shape[0])
        # [N, 4, 1, 1] from the whole prompt (CLIP is causal: the view words change only later tokens)
        code = emb.mean(1)[:, :4].view(-1, 4, 1, 1)
        return torch.tanh(sample * (1 + code)) + 1e-3 * t.view(-1, 1, 1, 1) + code ** 2
    return run


def ref_view_probabilities(prompt: str, folder: Path) -> torch.Tensor:
    """[3] P(view | prompt): full-vocabulary softmax at the [MASK], renormalized over the views."""
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    model = BertForMaskedLM.from_pretrained(str(folder)).eval()
    enc = tokenizer(f"This image is depicting a [MASK] view of {prompt}", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]                                      # [L, V]
    at = (enc.input_ids[0] == tokenizer.mask_token_id).nonzero().item()
    p = torch.softmax(logits[at].double(), dim=-1)
    ids = [MLM_WORDS.index(v) for v in ("front", "side", "back")]
    return p[ids] / p[ids].sum()


def ref_debias(prompt: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[list[bool]], list[str]]:
    """(p [3], q [W, 3], dropped [W][3], texts [3]): w leaves view v when p / (q/2 + p/2) < 0.95."""
    words = prompt.split(" ")
    p = ref_view_probabilities(prompt, folder)
    q = torch.stack([ref_view_probabilities(" ".join(words[:i] + words[i + 1:]), folder) for i in range(len(words))])
    dropped = [[float(p[v] / (0.5 * q[i, v] + 0.5 * p[v])) < 0.95 for v in range(3)] for i in range(len(words))]
    texts = [" ".join(w for i, w in enumerate(words) if not dropped[i][v]) for v in range(3)]
    return p, q, dropped, texts


def make_masked_lm(folder: Path, seed: int) -> Path:
    """A tiny random BERT masked language model + tokenizer, saved as from_pretrained reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(MLM_WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    # initializer_range 0.3 (BERT's is 0.02): large random weights make the view probabilities
    # move with the prompt's words, so that some words are dropped and others kept.
    config = BertConfig(vocab_size=len(MLM_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, initializer_range=0.3)
    BertForMaskedLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first seed whose reference decisions drop a word from some view and keep others, each
    decision at least 1e-3 away from the threshold (so float noise cannot flip it)."""
    root = tmp_path_factory.mktemp("mlm")
    for seed in range(20):
        folder = make_masked_lm(root / f"seed{seed}", seed)
        p, q, dropped, _ = ref_debias(TEXT, folder)
        flat = [d for row in dropped for d in row]
        margins = [abs(float(p[v] / (0.5 * q[i, v] + 0.5 * p[v])) - 0.95) for i in range(len(q)) for v in range(3)]
        if any(flat) and not all(flat) and min(margins) > 1e-3:
            return folder
    raise AssertionError("no seed in 0..19 gives a non-trivial debiasing")


def _opts(path: Path, **kw) -> GuidanceOptions:
    base = dict(sd_model=str(path), text=TEXT, guidance_weight=SCALE, image_resolution=RES, coarse_iter=10)
    base.update(kw)
    return GuidanceOptions(**base)


@pytest.fixture(scope="module")
def perpneg(tiny_sd_path: Path) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(_opts(tiny_sd_path, perp_neg=True), "cpu")


@pytest.fixture(scope="module")
def plain(tiny_sd_path: Path) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(_opts(tiny_sd_path, add_directional_text=True), "cpu")


def _offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, an empty cache (huggingface_hub's constants are read at call time)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- Perp-Neg formulas


def test_perpendicular_component_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    y[2] = 0.0                                                   # <y, y> = 0: the 1e-6 floor, x unchanged
    out = perpendicular(x, y)
    torch.testing.assert_close(out.double(), ref_perpendicular(x, y), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], x[2])
    dots = (out[:2] * y[:2]).flatten(1).sum(1)                   # perpendicular to y, per sample
    assert dots.abs().max() < 1e-4 * x.norm()
    with pytest.raises(ValueError, match=r"one shape.*\(3, 4, 5, 5\) and \(3, 4\)"):
        perpendicular(x, y[:, :, 0, 0])


@pytest.mark.parametrize("azimuth_deg", [0.0, 90.0, 180.0, -180.0, 30.0, -60.0, 89.0, 135.0, -150.0, 270.0])
def test_views_and_weights_by_azimuth(azimuth_deg: float) -> None:
    views = perp_neg_views(torch.tensor([math.radians(azimuth_deg)]))
    region, r, (w1, w2) = ref_views(azimuth_deg)
    assert bool(views.front_side[0]) == (region == "front_side")
    assert views.r[0].item() == pytest.approx(r, abs=1e-6)
    assert views.weights.shape == (1, 2)
    assert views.weights[0].tolist() == pytest.approx([w1, w2], abs=1e-5)


def test_named_views_weights() -> None:
    """Front: side prompt negative at -(4 - 2.426); side (90): front at -(e^-0.5 + 0.967); back:
    side at -(1 - 0.606), front at -(1 + 0.967)."""
    views = perp_neg_views(torch.tensor([0.0, math.pi / 2, math.pi]))
    torch.testing.assert_close(views.r, torch.tensor([1.0, 1.0, 0.0]))
    expected = [[-(4 * math.exp(-0.5) - 2.426), -(4 - 2.426)],
                [-(math.exp(-0.5) - 0.606), -(math.exp(-0.5) + 0.967)],
                [-(1 - 0.606), -(1 + 0.967)]]
    torch.testing.assert_close(views.weights, torch.tensor(expected), rtol=0, atol=1e-5)


def test_perp_neg_embeddings_blend_the_view_prompts(perpneg: StableDiffusionGuidance, tiny_sd_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_path), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(tiny_sd_path), subfolder="text_encoder").eval()

    def embed(prompt: str) -> torch.Tensor:                    # [L, D]
        ids = tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids).last_hidden_state[0].double()

    front, side, back = (embed(f"{TEXT}, {v} view") for v in ("front", "side", "back"))
    uncond = embed("low quality")
    azimuths = [0.0, 30.0, 90.0, 135.0, -170.0]
    rows, weights = perpneg.perp_neg_embeddings(torch.tensor([math.radians(a) for a in azimuths]), len(azimuths))
    b = len(azimuths)
    assert rows.shape == (4 * b, 77, front.shape[1]) and weights.shape == (b, 2)
    for i, az in enumerate(azimuths):
        region, r, ws = ref_views(az)
        pos, negs = ((r * front + (1 - r) * side, (front, side)) if region == "front_side"
                     else (r * side + (1 - r) * back, (side, front)))
        for got, want in zip(rows[i::b], (uncond, pos, *negs)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert weights[i].tolist() == pytest.approx(ws, abs=1e-5)


def test_guided_eps_for_a_fake_unet(perpneg: StableDiffusionGuidance, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(perpneg, "unet_runner", fake_unet(calls))
    gen = torch.Generator().manual_seed(4)
    z_t, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([30, 400, 900])
    azimuth = torch.tensor([0.3, 2.0, -2.9])
    rows, weights = perpneg.perp_neg_embeddings(azimuth, 3)
    eps = perpneg.predict_eps(z_t, t, rows, weights)
    assert calls == [12]                                         # one UNet call on 4B rows

    fake = fake_unet([])
    u, p, n1, n2 = (fake(z_t, t, part).double() for part in rows.chunk(4))
    e_pos = p - u
    expected = u + SCALE * (e_pos + weights[:, 0].double().view(-1, 1, 1, 1) * ref_perpendicular(n1 - u, e_pos)
                            + weights[:, 1].double().view(-1, 1, 1, 1) * ref_perpendicular(n2 - u, e_pos))
    torch.testing.assert_close(eps.double(), expected, rtol=1e-5, atol=1e-4)
    # The negatives change the result: Perp-Neg is not plain guidance on the blended prompt.
    assert (eps.double() - (u + SCALE * e_pos)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="expected 12 rows"):
        perpneg.predict_eps(z_t, t, rows[:6], weights)
    with pytest.raises(ValueError, match=r"weights: expected shape \(3, 2\)"):
        perp_neg_eps(u, p, (n1, n2), weights[:, :1], SCALE)


def test_draw_and_sds_use_the_four_branches(perpneg: StableDiffusionGuidance, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    forward = perpneg.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(perpneg.unet, "forward", counting)
    shape = perpneg.latent_shape(2)
    draw = perpneg.draw(shape, "geometry_coarse", 1, [0, 2], torch.Generator().manual_seed(0),
                        azimuth=torch.tensor([0.0, math.pi]))
    assert draw.text_emb.shape[0] == 8 and draw.neg_weights.shape == (2, 2)
    latents = torch.rand(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    result = perpneg.sds(latents, "geometry_coarse", 1, [0, 2], draw=draw)
    result.loss.backward()
    assert calls == [8] and result.nonfinite == 0 and latents.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="azimuth: expected .* because perp_neg is on, got None"):
        perpneg.draw(shape, "geometry_coarse", 1, [0, 2])


def test_perp_neg_implies_the_view_prompts() -> None:
    opts = GuidanceOptions(text="a cat", perp_neg=True)
    assert opts.prompts == ["a cat, front view", "a cat, side view", "a cat, back view", "a cat, side view"]
    assert GuidanceOptions(text="a cat").prompts == ["a cat"]
    assert GuidanceOptions(perp_neg_decay=[[1, 2, 3]] * 4).perp_neg_decay == ((1.0, 2.0, 3.0),) * 4
    with pytest.raises(GuidanceOptionsError, match=r"perp_neg_decay: expected four \[a, b, c\] triples"):
        GuidanceOptions(perp_neg_decay=[[1, 2, 3]] * 3)
    assert PERP_NEG_DECAY == (FRONT_IN_FS, SIDE_IN_FS, SIDE_IN_SB, FRONT_IN_SB)


# --------------------------------------------------------------------------- off: today's guidance


def test_options_off_by_default() -> None:
    opts = GuidanceOptions()
    assert not opts.perp_neg and not opts.prompt_debias and opts.perp_neg_decay == PERP_NEG_DECAY


def test_perp_neg_off_is_bit_identical_to_plain_guidance(plain: StableDiffusionGuidance, tiny_sd_path: Path) -> None:
    """Off, the step is classifier-free guidance on 2B rows exactly as before, whatever the decay."""
    other_decay = StableDiffusionGuidance(_opts(tiny_sd_path, add_directional_text=True,
                                                perp_neg_decay=[[1, 1, 1]] * 4), "cpu")
    shape = plain.latent_shape(3)
    views = [0, 1, 2]
    grads = []
    for guidance in (plain, other_decay):
        draw = guidance.draw(shape, "geometry_coarse", 1, views, torch.Generator().manual_seed(5),
                             azimuth=torch.tensor([0.1, 1.6, 3.0]))
        assert draw.neg_weights is None and torch.equal(draw.text_emb, guidance.text_embeddings(views, 3))
        latents = torch.rand(shape, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        guidance.sds(latents, "geometry_coarse", 1, views, draw=draw).loss.backward()
        grads.append(latents.grad)

        # The reference: the same draw through one eager 2B-row UNet call and the CFG formula.
        z_t = draw.add_noise(latents.detach())
        with torch.no_grad():
            out = guidance.unet(torch.cat([z_t, z_t]), torch.cat([draw.t, draw.t]),
                                encoder_hidden_states=draw.text_emb).sample.float()
        out_uncond, out_text = out.chunk(2)
        eps_hat = out_uncond + SCALE * (out_text - out_uncond)
        expected = draw.w.float().view(-1, 1, 1, 1) * (eps_hat - draw.noise)
        assert torch.equal(latents.grad, expected)
    assert torch.equal(grads[0], grads[1])


# --------------------------------------------------------------------------- prompt debiasing


def test_debiasing_matches_reference(masked_lm: Path) -> None:
    tokenizer = BertTokenizer.from_pretrained(str(masked_lm))
    model = BertForMaskedLM.from_pretrained(str(masked_lm)).eval()
    found = debias_prompt(TEXT, tokenizer, model)
    p, q, dropped, texts = ref_debias(TEXT, masked_lm)
    assert found.words == tuple(TEXT.split(" "))
    torch.testing.assert_close(found.p_full.double(), p, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(found.p_without.double(), q, rtol=1e-4, atol=1e-6)
    assert found.dropped.tolist() == dropped
    assert list(found.texts) == texts
    assert torch.allclose(found.p_full.sum(), torch.tensor(1.0))


def test_debiased_prompts_replace_the_view_prompts(masked_lm: Path, tiny_sd_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    embedded: list[list[str]] = []
    encode = sd.encode_prompts

    def recording(tokenizer, text_encoder, prompts):
        embedded.append(prompts)
        return encode(tokenizer, text_encoder, prompts)

    monkeypatch.setattr(sd, "encode_prompts", recording)
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, add_directional_text=True, prompt_debias=True,
                                             prompt_debias_model=str(masked_lm)), "cpu")
    _, _, _, texts = ref_debias(TEXT, masked_lm)
    assert list(guidance.debiased.texts) == texts
    assert embedded[0] == [f"{texts[i]}, {VIEWS[j]} view" for j, i in enumerate((0, 1, 2, 1))]
    assert guidance.text_embeds.shape[0] == 4
    # Without directional text the debiased prompts are the view prompts as they are.
    assert GuidanceOptions(text=TEXT, prompt_debias=True).prompts_for(texts) == [texts[0], texts[1], texts[2], texts[1]]


def test_view_words_must_be_single_tokens(tmp_path: Path) -> None:
    words = [w for w in MLM_WORDS if w != "side"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))
    with pytest.raises(PromptDebiasError, match="view word 'side' to be one token"):
        view_word_ids(tokenizer)
    assert DEBIAS_VIEWS == ("front", "side", "back")


def test_missing_hub_masked_lm_fails_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    tiny_sd_path: Path) -> None:
    cache = _offline_hub(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        StableDiffusionGuidance(_opts(tiny_sd_path, prompt_debias=True), "cpu")       # bert-base-uncased
    message = str(info.value)
    for part in ("'bert-base-uncased'", "config key prompt_debias_model", str(cache), "hf download bert-base-uncased",
                 "set prompt_debias false", "HF_HUB_OFFLINE=1"):
        assert part in message, part


def test_local_masked_lm_folder_is_checked(tmp_path: Path, masked_lm: Path) -> None:
    assert resolve_masked_lm(str(masked_lm)) == (str(masked_lm), True)
    with pytest.raises(InvalidModelFolderError, match="prompt_debias_model: local path .* does not exist"):
        resolve_masked_lm(str(tmp_path / "nowhere"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(InvalidModelFolderError, match=r"lacks model.safetensors \(or pytorch_model.bin\), vocab.txt"):
        resolve_masked_lm(str(half))


# --------------------------------------------------------------------------- training with Perp-Neg


@pytest.fixture
def unet_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every UNet call of guidances built from here on."""
    rows: list[int] = []
    eager = StableDiffusionGuidance.eager_unet

    def recording(self, sample, t, text_emb):
        rows.append(sample.shape[0])
        return eager(self, sample, t, text_emb)

    monkeypatch.setattr(StableDiffusionGuidance, "eager_unet", recording)
    return rows


@pytest.mark.slow
def test_geometry_run_with_perp_neg(tmp_path: Path, tiny_sd_path: Path, unet_rows: list[int],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDF pretraining needs ~40 steps before any grid vertex is outside the shape (its output
    # rises from the network's initial -0.2 at Adam's pace); a tenth of its points per step keeps
    # those steps cheap. Any closed start serves a test of the guidance.
    monkeypatch.setattr(DMTetGeometry, "pretrain",
                        lambda self, shape, iters, seed: pretrain_sdf(self, shape, iters=iters, seed=seed,
                                                                      batch_size=1024))
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, {
        "mode": "geometry_modeling", "text": "a cup", "sd_model": str(tiny_sd_path), "device": "cpu", "seed": 7,
        "dmtet_grid": 32, "train_res": [64, 64], "batch": 1, "iter": 2, "coarse_iter": 1, "save_interval": 2,
        "sdf_init_iter": 60, "validate": False, "video_frames": 0, "perp_neg": True, "out_dir": str(run_dir)})
    assert run_train(cfg) == 0
    log = read_log(run_dir)
    assert [r["stage"] for r in log] == ["geometry_coarse", "geometry_fine"]
    assert all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in log)
    assert unet_rows == [4, 4]                                    # uncond, pos, neg1, neg2 for the one camera


@pytest.mark.slow
def test_appearance_run_with_perp_neg(tmp_path: Path, tiny_sd_path: Path, unet_rows: list[int]) -> None:
    run_dir = tmp_path / "run"
    egg = write_textured_egg(tmp_path / "egg", n_lat=8, n_lon=16)
    cfg = write_config(tmp_path, {
        "mode": "appearance_modeling", "text": "a painted egg", "sd_model": str(tiny_sd_path), "base_mesh": str(egg),
        "device": "cpu", "seed": 3, "env_res": 64, "train_res": [64, 64], "batch": 2, "iter": 2, "coarse_iter": 1,
        "save_interval": 2, "texture_res": [32, 32], "validate": False, "video_frames": 0, "perp_neg": True,
        "out_dir": str(run_dir)})
    assert run_train(cfg) == 0
    log = read_log(run_dir)
    assert len(log) == 2 and all(math.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in log)
    assert unet_rows == [8, 8]                                    # 4 rows per camera, 2 cameras


# --------------------------------------------------------------------------- CUDA graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_the_four_branch_batch(tiny_sd_path: Path) -> None:
    # Uncompiled: the graph then holds the eager call's own kernels, equal to the bit.
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, perp_neg=True, diffusion_compile="off"), "cuda")
    assert isinstance(guidance.unet_runner, CudaGraphUNet)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):   # the first call captures the 4B-row graph, later ones replay it
        z_t = torch.randn(2, 4, 8, 8, device="cuda", generator=gen)
        t = torch.randint(20, 980, (2,), device="cuda", generator=gen)
        azimuth = torch.rand(2, device="cuda", generator=gen) * 2 * math.pi - math.pi
        rows, weights = guidance.perp_neg_embeddings(azimuth, 2)
        graphed = guidance.predict_eps(z_t, t, rows, weights)
        guidance.unet_runner, runner = guidance.eager_unet, guidance.unet_runner
        eager = guidance.predict_eps(z_t, t, rows, weights)
        guidance.unet_runner = runner
        # The graph replays the eager call's kernels on copies of the same inputs: equal values.
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert [key[0][0][0] for key in guidance.unet_runner.graphs] == [8]
