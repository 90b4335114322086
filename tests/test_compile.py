"""diffusion_compile: the compiled VAE encoder and UNet against the eager diffusers calls (sd.py).

Most tests compile with the "aot_eager" backend: dynamo's graph capture and AOTAutograd's backward,
without code generation. That checks what this repository adds (which calls compile, the same random
draws, gradients through the compiled backward, no recompiles across steps, the printed lines, the
fallback and the error) in seconds. Inductor's generated kernels are checked where they run, on the
GPU (the CUDA test below and scripts/dev/compile_check.py); on CPU, `compile_check.py --device cpu
--backend inductor` checks them in about two minutes of C++ compiling, too long for the suite.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch._dynamo

import sd
from config import ConfigError, build_config
from guidance.stable_diffusion import guidance_options
from run_status import RunInterrupted
from sd import (CompiledCall, CudaGraphUNet, DiffusionCompileError, GuidanceOptions, GuidanceOptionsError,
                StableDiffusionGuidance)

RES, BATCH = 64, 2          # 8x8 latents; batch 1 would let CPU convolutions pick an ambiguous layout


def _opts(path: Path, mode: str) -> GuidanceOptions:
    return GuidanceOptions(sd_model=str(path), text="a red car", image_resolution=RES, coarse_iter=10,
                           diffusion_compile=mode)


def _grad(guidance: StableDiffusionGuidance, stage: str, seed: int) -> torch.Tensor:
    """The SDS gradient [B, C, H, W] w.r.t. a fixed input of `stage` (coarse: latents; else images) for draw `seed`."""
    shape = (BATCH, 4, RES // 8, RES // 8) if stage == "geometry_coarse" else (BATCH, 3, RES, RES)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(7)).to(guidance.device).requires_grad_(True)
    it = 11 if stage == "geometry_fine" else 1
    guidance.sds(x, stage, it, generator=torch.Generator().manual_seed(seed)).loss.backward()
    return x.grad


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@contextlib.contextmanager
def _backend(name: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd, "COMPILE_BACKEND", name)
        yield


@pytest.fixture(scope="module")
def eager(tiny_sd_path: Path) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(_opts(tiny_sd_path, "off"), "cpu")


@pytest.fixture(scope="module")
def compiled(tiny_sd_path: Path) -> Iterator[tuple[StableDiffusionGuidance, str]]:
    """diffusion_compile=on (aot_eager), after one coarse and one fine step: (guidance, what they printed)."""
    torch._dynamo.reset()
    with _backend("aot_eager"):
        guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "on"), "cpu")
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed):
            _grad(guidance, "geometry_coarse", 0)
            _grad(guidance, "geometry_fine", 0)
        yield guidance, printed.getvalue()
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the key


def test_config_key_accepts_its_values_and_reaches_the_guidance() -> None:
    for value in ("auto", "on", "off"):
        cfg = build_config({"text": "a red car"}, [("diffusion_compile", value)])
        assert guidance_options(cfg).diffusion_compile == value
    assert build_config({"text": "a red car"}).diffusion_compile == "off"     # until measured on a GPU


@pytest.mark.parametrize("override, message", [
    (("diffusion_compile", "yes"), r"invalid value for 'diffusion_compile' in the command line: expected one of "
                                   r"\"off\", \"auto\", \"on\", got \"yes\""),
    (("diffusion_compil", "on"), r"unknown config key 'diffusion_compil' in the command line; "
                                 r"did you mean 'diffusion_compile'\?"),
])
def test_config_key_rejects_unknown_values_and_names(override: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"text": "a red car"}, [override])


def test_guidance_options_reject_an_unknown_mode(tiny_sd_path: Path) -> None:
    with pytest.raises(GuidanceOptionsError, match="diffusion_compile: expected 'auto', 'on' or 'off', got 'always'"):
        _opts(tiny_sd_path, "always")


def test_auto_on_cpu_prints_why_and_runs_eagerly(tiny_sd_path: Path, capsys: pytest.CaptureFixture) -> None:
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "auto"), "cpu")
    lines = [line for line in capsys.readouterr().err.splitlines() if "diffusion_compile" in line]
    assert len(lines) == 1 and lines[0].startswith("diffusion_compile=auto: the diffusion model runs eagerly on cpu: "
                                                   "compiling pays off on CUDA"), lines
    assert guidance.compiled_calls == []
    assert guidance.vae_runner == guidance.eager_vae_moments and guidance.unet_runner == guidance.eager_unet


def test_off_runs_eagerly_without_a_word(eager: StableDiffusionGuidance, capsys: pytest.CaptureFixture) -> None:
    assert eager.compiled_calls == [] and eager.vae_runner == eager.eager_vae_moments
    _grad(eager, "appearance", 0)
    assert "compil" not in capsys.readouterr().err


def test_cache_dir_is_per_user_and_stable_unless_chosen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # What importing inductor's config writes there counts as unset.
    monkeypatch.setenv(sd.COMPILE_CACHE_ENV, sd.default_cache_dir())
    assert sd.compile_cache_dir() == tmp_path / "xdg" / "fantasia3d" / "inductor"
    monkeypatch.setenv(sd.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert sd.compile_cache_dir() == tmp_path / "mine"
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    assert sd.use_compile_cache() == tmp_path / "mine" and os.environ[sd.COMPILE_CACHE_ENV] == str(tmp_path / "mine")
    assert torch._inductor.config.fx_graph_cache and torch._functorch.config.enable_autograd_cache


# --------------------------------------------------------------------------- the compiled calls


def test_compiled_gradient_matches_eager(compiled: tuple[StableDiffusionGuidance, str],
                                         eager: StableDiffusionGuidance) -> None:
    guidance, _ = compiled
    assert [c.name for c in guidance.compiled_calls] == ["VAE encoder", "UNet"]
    for stage in ("geometry_coarse", "geometry_fine", "appearance"):
        for seed in range(3):
            got, ref = _grad(guidance, stage, seed), _grad(eager, stage, seed)
            # fp32 on both sides, the same aten ops; the compiled backward is AOTAutograd's
            # decomposition (GroupNorm, SiLU), whose different summation order moves results by
            # float32 rounding (~1e-7 relative), amplified a little by CFG (weight 100). 1e-6 off
            # the cosine is still 1000x tighter than the 0.999 bar of fp16 on a GPU.
            assert _cosine(got, ref) > 1 - 1e-6, (stage, seed)
            assert (got - ref).norm() <= 1e-4 * ref.norm(), (stage, seed)


def test_compiled_latents_match_eager(compiled: tuple[StableDiffusionGuidance, str],
                                      eager: StableDiffusionGuidance) -> None:
    """Same posterior draw from the same generator: the sample is taken outside the compiled call."""
    guidance, _ = compiled
    imgs = torch.rand(BATCH, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    got = guidance.encode_images(imgs.clone().requires_grad_(True), torch.Generator().manual_seed(5))
    ref = eager.encode_images(imgs.clone().requires_grad_(True), torch.Generator().manual_seed(5))
    # Latents are O(1) (scaled by 0.18215); the encoder's ~10 layers in fp32 keep them to ~1e-7.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_first_use_prints_each_compile_with_its_time(compiled: tuple[StableDiffusionGuidance, str]) -> None:
    guidance, printed = compiled
    # Coarse and fine feed the UNet alike (contiguous [2B, 4, h, w]): one UNet graph serves both stages.
    assert list(guidance.compile_seconds()) == [
        "VAE encoder [2, 3, 64, 64] float32 (grad) forward and backward",
        "UNet [4, 4, 8, 8] float32, [4] int64, [4, 77, 32] float32 (no grad) forward"]
    for name, seconds in guidance.compile_seconds().items():
        call, what = name.split(" [", 1)
        assert f"compiling the {call} for [{what} (first use; cached in " in printed
        assert f"compiled the {call} for [{what}: {seconds:.1f} s" in printed


def test_no_recompilation_across_steps(compiled: tuple[StableDiffusionGuidance, str]) -> None:
    guidance, _ = compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(1, 4):     # new inputs, t and noise every step, the stage switch between
            for stage in ("geometry_coarse", "geometry_fine"):
                _grad(guidance, stage, seed)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert len(guidance.compile_seconds()) == 2


def test_eager_calls_swap_both_calls_for_the_block(compiled: tuple[StableDiffusionGuidance, str]) -> None:
    guidance, _ = compiled
    runners = guidance.vae_runner, guidance.unet_runner
    with guidance.eager_calls():
        assert (guidance.vae_runner, guidance.unet_runner) == (guidance.eager_vae_moments, guidance.eager_unet)
    assert (guidance.vae_runner, guidance.unet_runner) == runners


# --------------------------------------------------------------------------- failures


def _failing_compile(where: str, error: BaseException):
    """A torch.compile that raises `error` when called ("construction") or from the function it returns."""
    def fake(fn, **kwargs):
        if where == "construction":
            raise error

        def run(*args):
            raise error
        return run
    return fake


@pytest.mark.parametrize("where", ["construction", "first call"])
def test_auto_falls_back_to_eager_with_the_reason(where: str, tiny_sd_path: Path, eager: StableDiffusionGuidance,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sd, "compile_skip_reason", lambda device: None)     # auto compiles here, as on CUDA
    monkeypatch.setattr(torch, "compile", _failing_compile(where, RuntimeError("C++ compiler not found")))
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "auto"), "cpu")
    torch.testing.assert_close(_grad(guidance, "appearance", 0), _grad(eager, "appearance", 0), rtol=0, atol=0)
    err = capsys.readouterr().err
    for call in ("VAE encoder", "UNet"):
        assert (f"diffusion_compile=auto: compiling the {call} failed (RuntimeError: C++ compiler not found); "
                "it runs eagerly") in err
    assert all(c.failure == "RuntimeError: C++ compiler not found" for c in guidance.compiled_calls)


@pytest.mark.parametrize("where", ["construction", "first call"])
def test_on_turns_a_failed_compile_into_an_error_naming_the_key(where: str, tiny_sd_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", _failing_compile(where, RuntimeError("C++ compiler not found")))
    message = (r"diffusion_compile: compiling the (VAE encoder|UNet) failed \(RuntimeError: C\+\+ compiler not "
               r"found\); set diffusion_compile=off to run it eagerly")
    with pytest.raises(DiffusionCompileError, match=message):
        guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "on"), "cpu")
        _grad(guidance, "appearance", 0)


def test_a_stop_request_during_the_compile_is_no_fallback(tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C while dynamo traces reaches the run as the stop it is, even wrapped."""
    wrapped = RuntimeError("dynamo: internal error")
    wrapped.__cause__ = RunInterrupted(2)
    monkeypatch.setattr(sd, "compile_skip_reason", lambda device: None)
    monkeypatch.setattr(torch, "compile", _failing_compile("first call", wrapped))
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "auto"), "cpu")
    with pytest.raises(RunInterrupted):
        _grad(guidance, "appearance", 0)


def test_compiled_call_keeps_one_signature_per_layout() -> None:
    """Inputs are made contiguous first: a channels-last tensor reuses the contiguous one's graph."""
    calls: list[tuple] = []
    with _backend("aot_eager"):
        call = CompiledCall("doubler", lambda x: 2.0 * x, strict=True)
        call.compiled = lambda x: calls.append((tuple(x.shape), x.is_contiguous())) or 2.0 * x
        x = torch.rand(2, 3, 4, 4)
        call(x)
        call(x.to(memory_format=torch.channels_last))
    assert list(call.seconds) == ["[2, 3, 4, 4] float32 forward"]
    assert calls == [((2, 3, 4, 4), True)] * 3          # the warm-up, then the two calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_compiles_the_unet_inside_its_graph(tiny_sd_path: Path) -> None:
    torch._dynamo.reset()
    guidance = StableDiffusionGuidance(_opts(tiny_sd_path, "auto"), "cuda")
    eager = StableDiffusionGuidance(_opts(tiny_sd_path, "off"), "cuda")
    assert isinstance(guidance.unet_runner, CudaGraphUNet) and isinstance(guidance.unet_runner.forward, CompiledCall)
    with eager.eager_calls():
        for stage in ("geometry_coarse", "geometry_fine", "appearance"):
            for seed in range(3):
                # fp16: fused kernels round differently (~1e-3 relative), amplified by CFG (weight 100).
                assert _cosine(_grad(guidance, stage, seed), _grad(eager, stage, seed)) >= 0.999, (stage, seed)
    assert len(guidance.unet_runner.graphs) == 1 and len(guidance.compile_seconds()) == 2
    torch._dynamo.reset()
