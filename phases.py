"""The two training phases (geometry, appearance) and the guidance they use.

Each phase turns one camera batch into an SDS loss (`step`), renders validation views, and
exports its result; the loop in trainer.py does everything else.
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
import progress
from config import Config, resolve_path
from dataset.cameras import CameraBatch
from render import raster
from render.normal_render import normal_render_inputs, normal_to_display, render_normal_mask, shade_normal_mask
from render.util import resize_bilinear_aa
from sd import SdsDraw
from trainer import StepResult, to_uint8


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is written for the user: printed as one line, exit code 1."""
    from geometry.dmtet import EmptyMeshError
    from geometry.sdf_init import SdfInitError
    from render.cuda_graph import CudaGraphCaptureError
    from render.light import EnvMapError
    from render.mesh import MeshError
    from sd import ModelNotFoundError
    return (EmptyMeshError, SdfInitError, EnvMapError, MeshError, ModelNotFoundError,
            raster.RasterBackendError, CudaGraphCaptureError)


# ------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------
class Guide:
    """One call for both guidance sources: `guide(x, stage, it, cams, generator) -> SDSResult`."""

    def __init__(self, cfg: Config, device: torch.device, render_target=None) -> None:
        self.cfg = cfg
        if cfg.guidance == "target_mesh":
            from guidance_target import TargetGuidanceOptions, TargetMeshGuidance
            opts = TargetGuidanceOptions(cfg.coarse_iter, tuple(cfg.early_time_step_range),
                                         tuple(cfg.late_time_step_range), cfg.sds_weight_strategy)
            self.target = TargetMeshGuidance(render_target, opts, device)
            self.sd = None
        else:
            from sd import GuidanceOptions, StableDiffusionGuidance
            opts = GuidanceOptions(sd_model=cfg.sd_model, mode=cfg.mode, text=cfg.text,
                                   negative_text=cfg.negative_text, add_directional_text=cfg.add_directional_text,
                                   guidance_weight=float(cfg.guidance_weight),
                                   sds_weight_strategy=cfg.sds_weight_strategy,
                                   early_time_step_range=tuple(cfg.early_time_step_range),
                                   late_time_step_range=tuple(cfg.late_time_step_range),
                                   coarse_iter=cfg.coarse_iter, image_resolution=image_resolution(cfg),
                                   unet_cuda_graph=cfg.unet_cuda_graph)
            self.sd = StableDiffusionGuidance(opts, device)
            self.target = None

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator):
        """The step's render-independent random draw (sd.SdsDraw); make it before rendering."""
        if self.target is not None:
            shape = self.target.latent_shape(len(cams), stage, cams.resolution, latent_size(self.cfg))
            return self.target.draw(shape, stage, it, generator)
        return self.sd.draw(self.sd.latent_shape(len(cams)), stage, it, cams.view_index, generator)

    def __call__(self, x: torch.Tensor, stage: str, it: int, cams: CameraBatch, generator: torch.Generator,
                 draw: SdsDraw | None = None):
        if self.target is not None:
            return self.target.sds(x, stage, it, cams, generator, draw)
        return self.sd.sds(x, stage, it, cams.view_index, generator, draw)


def image_resolution(cfg: Config) -> int:
    """Square size the VAE sees (512 for the published train_res); latents are 1/8 of it."""
    side = max(cfg.train_res)
    return max(8, (side // 8) * 8)


def latent_size(cfg: Config) -> int:
    return image_resolution(cfg) // 8


def camera_chunks(cams: CameraBatch, size: int):
    """Consecutive sub-batches of at most `size` cameras (bounded memory for long turntables)."""
    for i in range(0, len(cams), size):
        yield CameraBatch(**{f: (v if f in ("resolution", "stream") else v[i:i + size]) for f, v in vars(cams).items()})


def render_turntable(cams: CameraBatch, render: Callable[[CameraBatch], np.ndarray], chunk: int = 8) -> np.ndarray:
    """The turntable's frames [N, H, W, 3] uint8, rendered `chunk` cameras at a time, with a
    progress bar (hundreds of frames at display resolution take a while)."""
    frames = []
    with contextlib.closing(progress.bar(len(cams), "video frames", unit="frame")) as bar:
        for part in camera_chunks(cams, chunk):
            frames.append(render(part))
            bar.update(len(part))
    return np.concatenate(frames)


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
        from render.cuda_graph import GraphedFunction
        self.cfg, self.ctx = cfg, ctx
        mode = cfg.render_cuda_graph
        if mode == "on" and ctx.backend != "nvdiffrast":
            raise raster.RasterBackendError(
                f"render_cuda_graph=on needs the nvdiffrast rasterizer on a CUDA device, got the {ctx.backend} "
                f"backend on {ctx.device}; use render_cuda_graph=auto (graphs where nvdiffrast runs) or off")
        use = mode == "on" or (mode == "auto" and ctx.backend == "nvdiffrast")
        self.graph = GraphedFunction(self._after_raster, "normal image ops after the rasterizer",
                                     "render_cuda_graph") if use else None

    def __call__(self, verts: torch.Tensor, faces: torch.Tensor, cams: CameraBatch, stage: str) -> torch.Tensor:
        coarse = stage == "geometry_coarse"
        rotate = cams.normal_rotate if coarse else None
        flip = coarse and self.cfg.if_flip_the_normal
        if self.graph is None or not (torch.is_grad_enabled() and verts.requires_grad):
            img = render_normal_mask(self.ctx, verts, faces, cams.mvp, cams.campos, cams.resolution, rotate, flip)
            return self._stage_input(img, coarse)
        inputs = normal_render_inputs(verts, faces, cams.mvp, cams.campos, rotate)
        rast, _ = raster.rasterize(self.ctx, inputs.pos_clip, inputs.tri, cams.resolution, grad_db=False)
        return self.graph(inputs.attr, rast, inputs.pos_clip, inputs.tri, inputs.sign_table, static=(coarse, flip))

    def _after_raster(self, attr: torch.Tensor, rast: torch.Tensor, pos_clip: torch.Tensor, tri: torch.Tensor,
                      sign_table: torch.Tensor, static: tuple[bool, bool]) -> torch.Tensor:
        coarse, flip = static
        img = shade_normal_mask(self.ctx, attr, rast, pos_clip, tri, sign_table, flip)   # [B, H, W, 4]
        return self._stage_input(img, coarse)

    def _stage_input(self, img: torch.Tensor, coarse: bool) -> torch.Tensor:
        if coarse:  # normal xyz + mask used directly as the 4-channel latent
            size = latent_size(self.cfg)
            return resize_bilinear_aa(img, (size, size))                              # [B, 4, h, w]
        return normal_to_display(img).permute(0, 3, 1, 2).contiguous()                 # [B, 3, H, W]


SURFACE_REGULARIZERS = ("laplacian_smoothness", "normal_consistency")   # config keys = geometry.smoothness names
SEALED_AIR_EVERY = 10   # iterations between searches for sealed air (each waits for the device)


def surface_regularizers(cfg: Config) -> list[tuple[str, float, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]:
    """(config key, weight, term(verts_vx3, faces_fx3) -> 0-dim) for each smoothness term with a
    nonzero weight."""
    from geometry import smoothness
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


def coarse_levels_vanishing_hint(levels: int, pretrain_mse: float | None) -> str:
    """Advice for a shape that vanished in the coarse stage with sdf_levels_coarse=`levels`, by
    the SDF pretraining's final mse (None: no pretraining this run, e.g. resumed)."""
    from geometry.sdf_init import LOOSE_FIT_MSE
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
    from geometry.sdf_init import LOOSE_FIT_MSE
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
        from geometry.dmtet import CapacityPlanner, DMTetGeometry
        self.cfg, self.info, self.run_dir = cfg, info, run_dir
        self.ctx = raster.make_context(info.device, cfg.raster_backend)
        self.geo = DMTetGeometry(self.grid_at(1), cfg.mesh_scale, backend=cfg.encoder_backend, device=info.device)
        # Training extracts the surface into fixed-size buffers, so the host never waits for the
        # surface's size; the sizes are read one step late (read_step) to resize the buffers.
        self.capacity = CapacityPlanner()
        self.render = NormalStageRenderer(cfg, self.ctx)
        self.guide = Guide(cfg, info.device, self._target_renderer() if cfg.guidance == "target_mesh" else None)
        self.pretrain_mse: float | None = None     # the SDF pretraining's final mse, once it ran
        self.surface_terms = surface_regularizers(cfg)
        self.sealed: tuple[tuple[int, int], torch.Tensor] | None = None   # ((refresh, grid), sealed-air rows)

    def _target_renderer(self):
        from render.mesh import load_mesh
        target = load_mesh(resolve_path(self.cfg.target_mesh), device=self.info.device)
        verts, faces = target.v_pos, target.t_pos_idx
        return lambda cams, stage: self.render(verts, faces, cams, stage)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.geo.parameters() if p.requires_grad]

    def stage(self, it: int) -> str:
        return "geometry_coarse" if it <= self.cfg.coarse_iter else "geometry_fine"

    def grid_at(self, it: int) -> int:
        """The tet grid of iteration `it`: dmtet_grid_coarse (when set) in the coarse stage."""
        coarse = self.cfg.dmtet_grid_coarse
        return coarse if coarse is not None and it <= self.cfg.coarse_iter else self.cfg.dmtet_grid

    def levels_at(self, it: int) -> int:
        """Hash-grid levels the SDF network uses at iteration `it`."""
        return sdf_levels_at(self.cfg, it, self.geo.sdf_net.n_levels)

    def _use_grid(self, grid_res: int) -> None:
        from geometry.dmtet import CapacityPlanner
        if grid_res != self.geo.grid_res:
            self.geo.set_grid(grid_res)
            self.capacity = CapacityPlanner()   # sized afresh from the new grid's first surface

    def prepare(self, resumed: bool) -> None:
        """SDF pretraining towards the initial shape (skipped when resuming: the weights are loaded)."""
        if resumed:   # the checkpoint set the hash-grid levels in use: a run resumed at its last
            return    # iteration exports with them (the coarse levels would give another mesh)
        self.geo.sdf_net.set_active_levels(self.levels_at(1))
        if self.cfg.sdf_init_iter == 0:
            return
        from geometry.sdf_init import InitShape, InitShapeOptions, check_pretraining_fit, pretrain_sdf
        c = self.cfg
        base = str(resolve_path(c.base_mesh)) if c.base_mesh else None
        shape = InitShape(InitShapeOptions(shape=c.sdf_init_shape, scale=tuple(c.sdf_init_shape_scale),
                                           rotate_x_deg=c.sdf_init_shape_rotate_x, translation_y=c.translation_y,
                                           translation_z=c.translation_z, base_mesh=base))
        # Same seed on every rank: identical pretraining, and rank 0's weights are broadcast anyway.
        start = time.perf_counter()
        loss = pretrain_sdf(self.geo, shape, iters=c.sdf_init_iter, seed=c.seed)   # a float: synchronized
        self.pretrain_mse = loss
        if self.info.is_main:
            print(f"SDF pretraining: {c.sdf_init_iter} steps in {time.perf_counter() - start:.1f} s, final mse "
                  f"{loss:.3e} (last 10 steps)", flush=True)
            check_pretraining_fit(loss, c.sdf_init_iter)

    def step(self, it: int, cams: CameraBatch, generator: torch.Generator) -> StepResult:
        stage = self.stage(it)
        self._use_grid(self.grid_at(it))
        self.geo.sdf_net.set_active_levels(self.levels_at(it))
        draw = self.guide.draw(stage, it, cams, generator)     # queued before the render's host waits
        with self._surface_errors(it):                          # the first extraction reads its counts
            surf = self.geo.extract_padded(self.capacity)
        x = self.render(surf.verts, surf.faces, cams, stage)
        sds = self.guide(x, stage, it, cams, generator, draw)
        used = torch.tensor(self.capacity.capacity)            # host values: the buffers this step had
        values = {"surface": surf.counts, "capacity": used}
        loss = sds.loss
        if self.cfg.sdf_regularizer > 0:
            from geometry.dmtet import sdf_regularizer_weight
            reg = surf.sign_change_loss()
            values["sdf_reg"] = reg.detach()
            loss = loss + sdf_regularizer_weight(self.cfg.sdf_regularizer, it, self.cfg.iter) * reg
        if self.cfg.sealed_air > 0:
            air, rows = self._sealed_air(it, surf.grid_sdf)
            values["sealed_air"], values["sealed_air_vertices"] = air.detach(), torch.tensor(float(rows.numel()))
            loss = loss + self.cfg.sealed_air * air
        for key, weight, term in self.surface_terms:
            value = term(surf.verts, surf.faces)
            values[key] = value.detach()
            loss = loss + weight * value
        return StepResult(loss=loss, sds=sds, device_values=values)

    def _sealed_air(self, it: int, grid_sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sealed-air term and the rows it acts on, found in this step's grid SDF (`grid_sdf` [V])
        anew every SEALED_AIR_EVERY iterations and on a new grid. Finding them waits for the device
        (the components are labelled on the host), hence not every step; every rank finds the same
        rows from the same weights, so nothing is exchanged."""
        from geometry.dmtet import sealed_air_loss
        key = ((it - 1) // SEALED_AIR_EVERY, self.geo.grid_res)
        if self.sealed is None or self.sealed[0] != key:
            self.sealed = (key, self.geo.sealed_air_rows(grid_sdf))
        rows = self.sealed[1]
        if rows.numel() == 0:
            return torch.zeros((), device=rows.device), rows
        sdf_r = self.geo.sdf_net(self.geo.grid_verts[rows])[0]                 # [R], with gradients
        # A vertex spacing inside: the filled region is solid, not a sliver at the threshold.
        return sealed_air_loss(sdf_r, self.cfg.mesh_scale / (self.geo.grid_res // 2)), rows

    @contextlib.contextmanager
    def _surface_errors(self, it: int) -> Iterator[None]:
        """An empty surface's error, told when it happened and the likely cause: at iteration 1 the
        SDF pretraining's fit; later in the coarse stage with coarse hash-grid levels, a smooth coarse
        SDF from a loosely pretrained start can vanish early."""
        from geometry.dmtet import EmptyMeshError
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
        """The step's surface size for the log; resizes the surface buffers (see CapacityPlanner)."""
        from geometry.dmtet import PaddedSurface, SurfaceCapacity
        counts = [int(c) for c in values["surface"]]
        with self._surface_errors(it):
            self.geo.check_counts(counts)
        used = SurfaceCapacity(*(int(c) for c in values["capacity"]))
        if self.grid_at(it) == self.geo.grid_res:   # not the last step on the grid before a switch
            self.capacity.update(counts)
        if PaddedSurface.overflow(counts, used) and self.info.is_main:
            print(f"\nwarning: iteration {it}: the surface outgrew its buffers (crossing tets / two-triangle tets / "
                  f"vertices / edge ends {' / '.join(map(str, counts[1:]))} for buffers of {used.tets} / {used.two} / "
                  f"{used.verts} / {used.verts + 1}); that step rendered it without some triangles. The buffers have "
                  "been enlarged.", file=sys.stderr, flush=True)
        record = {"faces": float(counts[1] + counts[2])}
        if self.cfg.sdf_levels_coarse is not None:
            record["sdf_levels"] = float(self.levels_at(it))
        for key in ("sdf_reg", "sealed_air", "sealed_air_vertices", *SURFACE_REGULARIZERS):
            if key in values:
                record[key] = values[key][0]
        return record

    def _normals(self, cams: CameraBatch) -> np.ndarray:
        verts, faces = self.geo.extract()
        img = render_normal_mask(self.ctx, verts, faces, cams.mvp, cams.campos, cams.resolution)
        return to_uint8(normal_to_display(img))  # the projection flips y, so rows are already top-down

    def validation_images(self, cams: CameraBatch) -> dict[str, np.ndarray]:
        return {"normal": self._normals(cams)}

    def turntable_frames(self, cams: CameraBatch) -> np.ndarray:
        return render_turntable(cams, self._normals)

    def export(self, out_dir: Path) -> list[Path]:
        from render.export import write_glb, write_obj
        from render.mesh import compute_vertex_normals, drop_enclosed_components, drop_small_components
        from render.uv import unwrap
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
        return [write_obj(out_dir, mesh), write_glb(out_dir / "mesh.glb", mesh)]

    def state_dict(self) -> dict[str, Any]:
        # The surface buffers' sizes too: a resumed run pads (and so renders) exactly as the straight one.
        cap = self.capacity.capacity
        # And the sealed-air rows in use: they were found at the last refresh, not from these weights.
        sealed = None if self.sealed is None else {"key": list(self.sealed[0]), "rows": self.sealed[1].cpu()}
        return {"geometry": self.geo.state_dict(), "surface_capacity": None if cap is None else list(cap),
                "grid_res": self.geo.grid_res, "sdf_levels": self.geo.sdf_net.active_levels, "sealed_air": sealed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from geometry.dmtet import SurfaceCapacity
        self.geo.set_grid(state.get("grid_res", self.geo.grid_res))   # the grid the buffers were saved on
        self.geo.load_state_dict(state["geometry"])
        self.geo.sdf_net.set_active_levels(state.get("sdf_levels", self.geo.sdf_net.n_levels))
        cap = state.get("surface_capacity")          # absent in checkpoints written before it existed
        self.capacity.capacity = None if cap is None else SurfaceCapacity(*cap)
        sealed = state.get("sealed_air")             # absent before it existed: found afresh
        self.sealed = None if sealed is None else (tuple(sealed["key"]), sealed["rows"].to(self.geo.grid_verts.device))


def build_phase(cfg: Config, info: distributed.DistInfo, run_dir: Path):
    if cfg.mode == "geometry_modeling":
        return GeometryPhase(cfg, info, run_dir)
    from phases_appearance import AppearancePhase
    return AppearancePhase(cfg, info, run_dir)
