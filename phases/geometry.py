"""The geometry phase: a surface from an SDF network, shaped by SDS on its normal renders.

The surface representation (DMTet by default) is reached only through geometry/base.py's
SurfaceGeometry interface and built by name from geometry/registry.py.

Coarse stage: the normal + mask image is the 4-channel latent (the published input); fine stage:
the normals shown as colours, encoded by the guidance. Both as the guidance's StageInput asks.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

import distributed
import geometry.dmtet  # noqa: F401  registers geometry "dmtet"
from config import Config, resolve_path
from dataset.cameras import CameraBatch
from geometry import smoothness
from geometry.base import EmptyMeshError, SurfaceGeometry, make_geometry
from geometry.sdf_init import LOOSE_FIT_MSE, InitShape, InitShapeOptions, check_pretraining_fit
from guidance.base import NORMAL_MASK, StageInput
from phases.base import StepResult, encoder_options, make_guidance, render_turntable, to_uint8
from render import raster
from render.cuda_graph import GraphedFunction
from render.export import export_mesh
from render.mesh import compute_vertex_normals, drop_enclosed_components, drop_small_components, load_mesh
from render.normal_render import normal_render_inputs, normal_to_display, render_normal_mask, shade_normal_mask
from render.util import resize_bilinear_aa
from render.uv import unwrap


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
class NormalStageRenderer:
    """Renders a mesh the way the geometry stages feed it to the guidance (shared with the target).

    In training steps on nvdiffrast (render_cuda_graph), the ops after the rasterizer (interpolation,
    shading, antialiasing and the stage's resize), forward and backward, replay from CUDA graphs:
    the rasterizer leaves the device idle, and one replay replaces ~30 launches from Python.
    Renders without gradients (validation, the target mesh) run eagerly.
    """

    def __init__(self, cfg: Config, ctx: raster.RasterContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        mode = cfg.render_cuda_graph
        if mode == "on" and ctx.backend != "nvdiffrast":
            raise raster.RasterBackendError(
                f"render_cuda_graph=on needs the nvdiffrast rasterizer on a CUDA device, got the {ctx.backend} "
                f"backend on {ctx.device}; use render_cuda_graph=auto (graphs where nvdiffrast runs) or off")
        use = mode == "on" or (mode == "auto" and ctx.backend == "nvdiffrast")
        self.graph = GraphedFunction(self._after_raster, "normal image ops after the rasterizer",
                                     "render_cuda_graph") if use else None

    def __call__(self, verts: torch.Tensor, faces: torch.Tensor, cams: CameraBatch, spec: StageInput) -> torch.Tensor:
        """The render in `spec`'s format: [B, 4, s, s] (NORMAL_MASK: camera-space normals, flipped as
        if_flip_the_normal says, + mask) or [B, 3, H, W] (IMAGE: world normals shown as colours)."""
        latent = spec.kind == NORMAL_MASK
        rotate = cams.normal_rotate if latent else None
        flip = latent and self.cfg.if_flip_the_normal
        size = spec.size if latent else None
        if self.graph is None or not (torch.is_grad_enabled() and verts.requires_grad):
            img = render_normal_mask(self.ctx, verts, faces, cams.mvp, cams.campos, cams.resolution, rotate, flip,
                                     self.cfg.antialias)
            return self._stage_input(img, size)
        inputs = normal_render_inputs(verts, faces, cams.mvp, cams.campos, rotate)
        rast, _ = raster.rasterize(self.ctx, inputs.pos_clip, inputs.tri, cams.resolution, grad_db=False)
        return self.graph(inputs.attr, rast, inputs.pos_clip, inputs.tri, inputs.sign_table, static=(size, flip))

    def _after_raster(self, attr: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor,
                      sign_table: torch.Tensor, static: tuple[int | None, bool]) -> torch.Tensor:
        size, flip = static
        img = shade_normal_mask(self.ctx, attr, rast, pos_clip, tri, sign_table, flip,
                                antialias=self.cfg.antialias)                          # [B, H, W, 4]
        return self._stage_input(img, size)

    @staticmethod
    def _stage_input(img: torch.Tensor, latent_size: int | None) -> torch.Tensor:
        if latent_size is not None:   # normal xyz + mask used directly as the 4-channel latent
            return resize_bilinear_aa(img, (latent_size, latent_size))                # [B, 4, s, s]
        return normal_to_display(img).permute(0, 3, 1, 2).contiguous()                 # [B, 3, H, W]


SURFACE_REGULARIZERS = ("laplacian_smoothness", "normal_consistency")   # config keys = geometry.smoothness names
SEALED_AIR_EVERY = 10   # iterations between searches for sealed air (each waits for the device)


def sdf_regularizer_weight(weight: float, it: int, iters: int) -> float:
    """nvdiffrec's schedule of the SDF sign-change regularizer: `weight` at the start, falling
    linearly to weight / 20 at a quarter of the run, then constant."""
    return weight - (weight - weight / 20) * min(1.0, 4.0 * it / iters)


def surface_regularizers(cfg: Config) -> list[tuple[str, float, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    """(config key, weight, term(verts_vx3, faces_fx3) -> 0-dim) for each smoothness term with a
    nonzero weight."""
    return [(key, getattr(cfg, key), getattr(smoothness, key)) for key in SURFACE_REGULARIZERS if getattr(cfg, key) > 0]


def sdf_levels_at(cfg: Config, it: int, n_levels: int) -> int:
    """Hash-grid levels of the SDF network at iteration `it`: sdf_levels_coarse up to coarse_iter,
    then one more level every sdf_levels_ramp / (n_levels - sdf_levels_coarse) iterations (all at
    once when the ramp is 0); n_levels throughout when sdf_levels_coarse is null."""
    k = cfg.sdf_levels_coarse
    if k is None or k >= n_levels:
        return n_levels
    if it <= cfg.coarse_iter:
        return k
    if cfg.sdf_levels_ramp == 0:
        return n_levels
    return min(n_levels, k + math.ceil((n_levels - k) * (it - cfg.coarse_iter) / cfg.sdf_levels_ramp))


def grid_at(cfg: Config, it: int) -> int:
    """The tet grid of iteration `it`: min(dmtet_grid, dmtet_grid_coarse) up to coarse_iter (the
    surface forms on a grid no finer than the coarse cap), dmtet_grid after it."""
    cap = cfg.dmtet_grid_coarse
    return min(cfg.dmtet_grid, cap) if cap is not None and it <= cfg.coarse_iter else cfg.dmtet_grid


def coarse_levels_vanishing_hint(levels: int, pretrain_mse: float | None) -> str:
    """Advice for a shape that vanished in the coarse stage with sdf_levels_coarse=`levels`, by
    the SDF pretraining's final mse (None: no pretraining this run, e.g. resumed)."""
    head = (f"The shape was there before and sdf_levels_coarse={levels} limits the coarse stage's SDF to its "
            "coarse hash-grid levels")
    if pretrain_mse is not None and pretrain_mse <= LOOSE_FIT_MSE:
        return (f"{head}; its pretraining fitted the initial shape well (mse {pretrain_mse:.1e}), so the guidance "
                "(or a regularizer) removed it: set sdf_levels_coarse=null (all levels from the start), "
                "or lower guidance_weight.")
    fit = "" if pretrain_mse is None else f" (this run's: mse {pretrain_mse:.1e}, above {LOOSE_FIT_MSE:.1e})"
    return (f"{head}: from a loosely pretrained start{fit} it can vanish in the first iterations, before "
            "thin parts form. Raise sdf_init_iter (the default is 2000), or set sdf_levels_coarse=null.")


def empty_start_hint(pretrain_mse: float, iters: int) -> str:
    """Advice for a surface already empty at iteration 1, before any SDS step: the SDF pretraining
    (`iters` steps, final mse `pretrain_mse`) left no grid vertex inside the initial shape."""
    head = f"The SDF pretraining ({iters} steps, final mse {pretrain_mse:.1e}) left no grid vertex inside the shape"
    thin = "enlarge sdf_init_shape_scale or raise dmtet_grid."
    if pretrain_mse > LOOSE_FIT_MSE:
        # Seen in a CPU test: 80 steps (mse 2e-2) left a barely negative SDF that the grid missed.
        return (f"{head}: it fitted loosely (above {LOOSE_FIT_MSE:.1e}); raise sdf_init_iter (the default is "
                f"2000), or, if the shape is thinner than two tet grid cells (warned above), {thin}")
    return f"{head}, though it fitted well: the initial shape is thinner than the tet grid resolves; {thin}"


class GeometryPhase:
    name = "geometry"
    lr = 1e-3
    prepare_activity = "SDF pretraining"

    def __init__(self, cfg: Config, info: distributed.DistInfo, run_dir: Path) -> None:
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.ctx = raster.make_context(info.device, cfg.raster_backend)
        # The config's `geometry`: a registered surface representation (geometry/registry.py).
        self.geo: SurfaceGeometry = make_geometry(cfg.geometry, grid_res=self.grid_at(1), mesh_scale=cfg.mesh_scale,
                                                  backend=cfg.encoder_backend, encoder_opts=encoder_options(cfg),
                                                  device=info.device)
        self.render = NormalStageRenderer(cfg, self.ctx)
        self.guide = make_guidance(cfg, info.device, self._target_renderer)
        self.pretrain_mse: float | None = None     # the SDF pretraining's final mse, once it ran
        self.surface_terms = surface_regularizers(cfg)

    def _target_renderer(self):
        target = load_mesh(resolve_path(self.cfg.target_mesh), device=self.info.device)
        verts, faces = target.v_pos, target.t_pos_idx
        return lambda cams, stage: self.render(verts, faces, cams, self.guide.stage_input(stage))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.geo.parameters() if p.requires_grad]

    def stage(self, it: int) -> str:
        return "geometry_coarse" if it <= self.cfg.coarse_iter else "geometry_fine"

    def grid_at(self, it: int) -> int:
        """The tet grid of iteration `it`: at most dmtet_grid_coarse (when set) in the coarse stage."""
        return grid_at(self.cfg, it)

    def levels_at(self, it: int) -> int:
        """Hash-grid levels the SDF network uses at iteration `it`."""
        return sdf_levels_at(self.cfg, it, self.geo.n_levels)

    def prepare(self, resumed: bool) -> None:
        """SDF pretraining towards the initial shape (skipped when resuming: the weights are loaded)."""
        if resumed:   # the checkpoint set the hash-grid levels in use: a run resumed at its last
            return    # iteration exports with them (the coarse levels would give another mesh)
        self.geo.set_active_levels(self.levels_at(1))
        if self.cfg.sdf_init_iter == 0:
            return
        c = self.cfg
        base = str(resolve_path(c.base_mesh)) if c.base_mesh else None
        shape = InitShape(InitShapeOptions(shape=c.sdf_init_shape, scale=tuple(c.sdf_init_shape_scale),
                                           rotate_x_deg=c.sdf_init_shape_rotate_x, translation_y=c.translation_y,
                                           translation_z=c.translation_z, base_mesh=base))
        # Same seed on every rank: identical pretraining, and rank 0's weights are broadcast anyway.
        start = time.perf_counter()
        loss = self.geo.pretrain(shape, iters=c.sdf_init_iter, seed=c.seed)   # a float: synchronized
        self.pretrain_mse = loss
        if self.info.is_main:
            print(f"SDF pretraining: {c.sdf_init_iter} steps in {time.perf_counter() - start:.1f} s, final mse "
                  f"{loss:.3e} (last 10 steps)", flush=True)
            check_pretraining_fit(loss, c.sdf_init_iter)

    def step(self, it: int, cams: CameraBatch, generator: torch.Generator) -> StepResult:
        stage = self.stage(it)
        self.geo.set_grid(self.grid_at(it))                    # a new grid sizes its buffers afresh
        self.geo.set_active_levels(self.levels_at(it))
        draw = self.guide.draw(stage, it, cams, generator)     # queued before the render's host waits
        with self._surface_errors(it):                          # the first extraction reads its counts
            surf = self.geo.extract_padded()
        x = self.render(surf.verts, surf.faces, cams, self.guide.stage_input(stage))
        sds = self.guide.sds(x, stage, it, cams, generator, draw)
        used = torch.tensor(self.geo.capacity)                 # host values: the buffers this step had
        values = {"surface": surf.counts, "capacity": used}
        loss = sds.loss
        if self.cfg.sdf_regularizer > 0:
            reg = self.geo.sign_change_loss(surf)
            values["sdf_reg"] = reg.detach()
            loss = loss + sdf_regularizer_weight(self.cfg.sdf_regularizer, it, self.cfg.iter) * reg
        if self.cfg.sealed_air > 0:
            # Searched anew every SEALED_AIR_EVERY iterations (a search waits for the device).
            air = self.geo.sealed_air_term(surf, (it - 1) // SEALED_AIR_EVERY)
            values["sealed_air"], values["sealed_air_vertices"] = air.loss.detach(), torch.tensor(float(air.vertices))
            loss = loss + self.cfg.sealed_air * air.loss
        for key, weight, term in self.surface_terms:
            value = term(surf.verts, surf.faces)
            values[key] = value.detach()
            loss = loss + weight * value
        return StepResult(loss=loss, sds=sds, device_values=values)

    @contextlib.contextmanager
    def _surface_errors(self, it: int) -> Iterator[None]:
        """An empty surface's error, told when it happened and the likely cause: at iteration 1 the
        SDF pretraining's fit; later in the coarse stage with coarse hash-grid levels, a smooth coarse
        SDF from a loosely pretrained start can vanish early."""
        try:
            yield
        except EmptyMeshError as e:
            hint = ""
            if it == 1 and self.pretrain_mse is not None:
                hint = " " + empty_start_hint(self.pretrain_mse, self.cfg.sdf_init_iter)
            elif self.cfg.sdf_levels_coarse is not None and it > 1 and self.stage(it) == "geometry_coarse":
                hint = " " + coarse_levels_vanishing_hint(self.cfg.sdf_levels_coarse, self.pretrain_mse)
            raise EmptyMeshError(f"iteration {it} ({self.stage(it)}): {e}{hint}") from e

    def read_step(self, it: int, values: dict[str, list[float]]) -> dict[str, float]:
        """The step's surface size for the log; sizes the next steps' surface buffers (read_counts)."""
        counts = [int(c) for c in values["surface"]]
        used = tuple(int(c) for c in values["capacity"])
        # Not on the last step on a grid before a switch: its counts say nothing about the new grid.
        resize = self.grid_at(it) == self.geo.grid_res
        with self._surface_errors(it):
            report = self.geo.read_counts(counts, used, resize)
        if report.overflow and self.info.is_main:
            print(f"\nwarning: iteration {it}: {report.overflow}", file=sys.stderr, flush=True)
        record = {"faces": float(report.faces)}
        if self.cfg.sdf_levels_coarse is not None:
            record["sdf_levels"] = float(self.levels_at(it))
        for key in ("sdf_reg", "sealed_air", "sealed_air_vertices", *SURFACE_REGULARIZERS):
            if key in values:
                record[key] = values[key][0]
        return record

    def _normals(self, cams: CameraBatch) -> np.ndarray:
        verts, faces = self.geo.extract()
        img = render_normal_mask(self.ctx, verts, faces, cams.mvp, cams.campos, cams.resolution,
                                 antialias=self.cfg.antialias)
        return to_uint8(normal_to_display(img))  # the projection flips y, so rows are already top-down

    def validation_images(self, cams: CameraBatch) -> dict[str, np.ndarray]:
        return {"normal": self._normals(cams)}

    def turntable_frames(self, cams: CameraBatch) -> np.ndarray:
        return render_turntable(cams, self._normals)

    def export(self, out_dir: Path) -> list[Path]:
        with torch.no_grad():
            mesh = self.geo.mesh(with_normals=False).to("cpu")
        frac = self.cfg.mesh_min_component_fraction
        mesh, kept = drop_small_components(mesh, frac)
        if kept.dropped:
            print(f"removed {kept.dropped} of {kept.components} connected components ({kept.dropped_faces} faces), "
                  f"each under {frac:.1%} of the faces (mesh_min_component_fraction=0 keeps them)", flush=True)
        if self.cfg.mesh_drop_enclosed:
            mesh, hidden = drop_enclosed_components(mesh)
            if hidden.dropped:
                print(f"removed {hidden.dropped} components ({hidden.dropped_faces} faces) enclosed by the rest of the "
                      "surface: voids or shells inside the solid that no view sees (mesh_drop_enclosed=false keeps them)",
                      flush=True)
        mesh = unwrap(compute_vertex_normals(mesh))   # large meshes: a line before and after (render/uv.py)
        return export_mesh(out_dir, mesh)

    def state_dict(self) -> dict[str, Any]:
        return self.geo.training_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.geo.load_training_state(state)
