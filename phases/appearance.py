"""Appearance phase: a PBR material MLP (kd / ks / normal) on a fixed mesh under an HDR environment."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed
from config import Config, resolve_path
from dataset.cameras import CameraBatch
from geometry.fixed_mesh import FixedMeshGeometry
from geometry.hashgrid import make_encoder
from guidance.base import IMAGE, GuidanceInputError
from phases.base import StepResult, encoder_options, make_guidance, render_turntable, to_uint8
from render import raster
from render.bake import bake
from render.export import export_mesh, write_probe
from render.light import EnvironmentLight, default_environment
from render.material import MaterialMLP
from render.mesh import load_mesh
from render.pbr_render import rasterize_gbuffer_on, render_pbr, render_textured
from run_status import TrainingError

# Published display layer names -> our shading modes.
DISPLAY_MODES = {"pbr": "pbr", "shaded": "pbr", "diffuse": "diffuse", "kd": "kd", "ks": "ks", "normal": "normal"}
# kd spread (std over covered texels) below which the baked albedo counts as constant.
CONSTANT_TEXTURE_STD = 1e-3


def load_light(path: str | None, scale: float, res: int, device: torch.device) -> EnvironmentLight:
    if path is None:
        return default_environment(scale=scale, res=res, device=device)
    return EnvironmentLight.load(resolve_path(path), scale=scale, res=res, device=device)


def checker_background(resolution: tuple[int, int], device: torch.device, cells: int = 8) -> torch.Tensor:
    h, w = resolution
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    on = ((yy * cells // h + xx * cells // w) % 2).float()[..., None]          # [H, W, 1]
    return (0.25 + 0.5 * on).expand(h, w, 3)


class AppearancePhase:
    name = "appearance"
    lr = 1e-2
    prepare_activity = "preparation"

    def __init__(self, cfg: Config, info: distributed.DistInfo, run_dir: Path) -> None:
        if cfg.train_background == "reference":
            raise TrainingError("train_background='reference' needs reference images, which text-to-3D does not "
                                "have; use black, white or checker")
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        device = info.device
        self.ctx = raster.make_context(device, cfg.raster_backend)
        self.geometry = FixedMeshGeometry(resolve_path(cfg.base_mesh), device=device)
        self.mesh = self.geometry.mesh()
        encoder = make_encoder(self.geometry.aabb, encoder_options(cfg), backend=cfg.encoder_backend)
        self.material = MaterialMLP(encoder, cfg.kd_min[:3], cfg.kd_max[:3], cfg.ks_min, cfg.ks_max,
                                    cfg.nrm_min, cfg.nrm_max).to(device)
        self.light = load_light(cfg.envmap, cfg.env_scale, cfg.env_res, device)
        self._relights: dict[str, EnvironmentLight] = {}  # built once, reused at every validation
        self.guide = make_guidance(cfg, device, self._target_renderer)
        if self.guide.stage_input("appearance").kind != IMAGE:
            raise GuidanceInputError(f"guidance={cfg.guidance} asks for {self.guide.stage_input('appearance').kind} "
                                     f"in the appearance stage, which renders images only ({IMAGE!r})")

    # ------------------------------------------------------------------------------------ rendering
    def _background(self, resolution: tuple[int, int], name: str | None = None):
        name = name or self.cfg.train_background
        return checker_background(resolution, self.info.device) if name == "checker" else name

    def _render(self, cams: CameraBatch, mode: str = "pbr", light: EnvironmentLight | None = None,
                background: str | None = None) -> torch.Tensor:
        # The mesh is fixed, so the G-buffer needs only the cameras: it is made on their stream
        # (training, CUDA), where the rasterizer's host wait does not wait for the previous step.
        gb = rasterize_gbuffer_on(cams.stream, self.ctx, self.mesh, cams.mvp, cams.resolution)
        image, _ = render_pbr(self.ctx, self.mesh, cams.mvp, cams.campos, cams.resolution, self.material,
                              light or self.light, mode=mode, use_bump=self.cfg.if_use_bump,
                              background=self._background(cams.resolution, background), gbuffer=gb,
                              antialias=self.cfg.antialias)
        return image                                                                 # [B, H, W, 3]

    def _target_renderer(self):
        """The textured target shaded by the same light, with ks fixed at the middle of the configured
        range (the albedo is what an appearance target run recovers)."""
        path = resolve_path(self.cfg.target_mesh)
        target = FixedMeshGeometry(load_mesh(path, device=self.info.device), device=self.info.device).mesh()
        if not target.material or "kd" not in target.material:
            raise TrainingError(f"target_mesh {path} has no albedo texture: an appearance run under "
                                "guidance=target_mesh recovers the target's texture; give a textured OBJ (with "
                                "its .mtl and map_Kd image) or GLB")
        ks = tuple(0.5 * (lo + hi) for lo, hi in zip(self.cfg.ks_min, self.cfg.ks_max))

        def render(cams: CameraBatch, stage: str) -> torch.Tensor:
            img = render_textured(self.ctx, target, cams.mvp, cams.campos, cams.resolution, self.light, ks,
                                  background=self._background(cams.resolution), antialias=self.cfg.antialias)
            return img.permute(0, 3, 1, 2)
        return render

    # ------------------------------------------------------------------------------------ training
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.material.parameters() if p.requires_grad]

    def stage(self, it: int) -> str:
        return "appearance"

    def prepare(self, resumed: bool) -> None:
        pass

    def step(self, it: int, cams: CameraBatch, generator: torch.Generator) -> StepResult:
        draw = self.guide.draw("appearance", it, cams, generator)   # queued before the render's host waits
        x = self._render(cams).permute(0, 3, 1, 2).contiguous()                     # [B, 3, H, W] sRGB
        sds = self.guide.sds(x, "appearance", it, cams, generator, draw)
        return StepResult(loss=sds.loss, sds=sds)

    def read_step(self, it: int, values: dict[str, list[float]]) -> dict[str, float]:
        return {}   # no device values: the mesh is fixed

    # ------------------------------------------------------------------------------------ output
    def validation_images(self, cams: CameraBatch) -> dict[str, np.ndarray]:
        images = {"shaded": to_uint8(self._render(cams, background="white"))}
        for layer in self.cfg.display or [{"bsdf": "kd"}, {"bsdf": "ks"}, {"bsdf": "normal"}]:
            if "bsdf" in layer:
                mode = DISPLAY_MODES[layer["bsdf"]]
                images[layer["bsdf"]] = to_uint8(self._render(cams, mode=mode, background="white"))
            elif layer.get("latlong"):
                h, w = cams.resolution
                ll = self.light.to_latlong(h).clamp(0, 1)                            # [h, 2h, 3] linear, clipped
                images["latlong"] = to_uint8(ll[None]) if ll.dim() == 3 else to_uint8(ll)
            elif "relight" in layer:
                images["relight"] = to_uint8(self._render(cams, light=self._relight(layer["relight"]),
                                                          background="white"))
        if self.cfg.relight:
            images["relight"] = to_uint8(self._render(cams, light=self._relight(self.cfg.relight), background="white"))
        return images

    def _relight(self, path: str) -> EnvironmentLight:
        if path not in self._relights:
            self._relights[path] = load_light(path, self.cfg.env_scale, self.cfg.env_res, self.info.device)
        return self._relights[path]

    def turntable_frames(self, cams: CameraBatch) -> np.ndarray:
        return render_turntable(cams, lambda part: to_uint8(self._render(part, background="white")))

    def export(self, out_dir: Path) -> list[Path]:
        with torch.no_grad():
            maps = bake(self.mesh, self.material, tuple(self.cfg.texture_res), self.cfg.uv_padding_block, ctx=self.ctx)
        self._warn_if_constant(maps)
        mesh = self.mesh.to("cpu")
        return [*export_mesh(out_dir, mesh, maps), write_probe(out_dir / "probe.hdr", self.light)]

    @staticmethod
    def _warn_if_constant(maps: Any) -> None:
        covered = maps.mask > 0
        if covered.any() and float(maps.kd[covered].std(dim=0).max()) < CONSTANT_TEXTURE_STD:
            print("warning: the baked albedo is constant (no texture was learned). Check that the prompt "
                  "describes colours, raise guidance_weight or iter, or try sds_weight_strategy 2.",
                  file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"material": self.material.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.material.load_state_dict(state["material"])
