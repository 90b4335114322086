"""The Gradio page: pick a shipped config, type the prompt, start, watch, download."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

import config as C
from webapp.recipes import default_recipe
from webapp.service import JobView, RequestError, RunRequest, Studio, UploadError

REFRESH_S = 1.0
INTRO = ("Text to a textured 3D mesh. Pick a shipped config (geometry, appearance, or both in sequence), type a "
         "prompt and start. Upload a mesh to fine-tune it (geometry) or texture it (appearance). Blank fields "
         "keep the config's values. One run at a time per GPU; later requests wait in line.")
EXTRA_HINT = "more config keys, one key=value per line (e.g. sdf_init_iter=500); paths are refused"


@dataclass(frozen=True)
class NumberField:
    """A number box; blank keeps the config's value, which the placeholder shows."""
    label: str
    key: str             # the config key it sets
    kind: type           # int or float
    elem_id: str

    def parse(self, text: str | None) -> int | float | None:
        text = (text or "").strip()
        if not text:
            return None
        try:
            value = float(text)
            return int(value) if self.kind is int and value.is_integer() else self.kind(text)
        except ValueError:
            what = "an integer" if self.kind is int else "a number"
            raise RequestError(f"{self.label}: expected {what}, got '{text}'") from None


NUMBERS = (NumberField("Seed", "seed", int, "seed"),
           NumberField("Guidance weight", "guidance_weight", float, "guidance"),
           NumberField("Iterations", "iter", int, "iterations"),
           NumberField("Tet grid (geometry)", "dmtet_grid", int, "grid"))


def _placeholders(studio: Studio, label: str) -> list[Any]:
    """The chosen config's values (both configs' for a sequence), shown in the blank number boxes."""
    files = [C.read_json(path) for path in studio.recipes[label].configs]
    defaults = C.Config()
    return [gr.update(placeholder="config: " + " / ".join(str(v.get(f.key, getattr(defaults, f.key))) for v in files))
            for f in NUMBERS]


def _request(recipe: str, prompt: str, negative: str, extra: str, numbers: list[str]) -> RunRequest:
    seed, guidance, iterations, grid = (f.parse(text) for f, text in zip(NUMBERS, numbers))
    return RunRequest(recipe, prompt or "", negative or "", seed, guidance, iterations, grid, extra or "")


def _outputs(view: JobView) -> tuple[Any, ...]:
    """(status, validation image, download files, the GLB for the viewer once the job ends)."""
    return (view.status, str(view.image) if view.image else None, [str(p) for p in view.files] or None,
            str(view.glb) if view.glb else None)


def _watch(studio: Studio, values: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Queue the form's job, then refresh the page from it until it ends."""
    recipe, prompt, negative, extra, upload, *numbers = values
    try:
        job = studio.submit(_request(recipe, prompt, negative, extra, numbers), upload)
    except (RequestError, UploadError) as e:
        yield (f"error: {e}", None, None, None)
        return
    while True:
        view = studio.view(job)
        yield _outputs(view)
        if view.done:
            return
        time.sleep(REFRESH_S)


def build(studio: Studio, have_gpu: bool) -> gr.Blocks:
    default = default_recipe(list(studio.recipes.values()), have_gpu).label
    suffixes = list(studio.opts.limits.suffixes)
    with gr.Blocks(title="Fantasia3D", delete_cache=(3600, 24 * 3600)) as page:
        gr.Markdown(f"## Fantasia3D\n{INTRO}")
        with gr.Row():
            with gr.Column():
                recipe = gr.Dropdown(list(studio.recipes), value=default, label="Config", elem_id="recipe")
                prompt = gr.Textbox(label="Prompt", placeholder="a red car", max_lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", max_lines=2, elem_id="negative")
                with gr.Row():
                    numbers = [gr.Textbox(label=f.label, max_lines=1, min_width=100, elem_id=f.elem_id)
                               for f in NUMBERS]
                upload = gr.File(label=f"Mesh to fine-tune or texture ({', '.join(suffixes)}; up to "
                                       f"{studio.opts.limits.max_mb:g} MB)",
                                 file_types=suffixes, type="filepath", height=150, elem_id="mesh")
                extra = gr.Textbox(label="More keys", placeholder=EXTRA_HINT, lines=2, elem_id="extra")
                start = gr.Button("Start", variant="primary", elem_id="start")
            with gr.Column():
                status = gr.Textbox(label="Status", lines=3, interactive=False, elem_id="status")
                image = gr.Image(label="Latest validation views", type="filepath", interactive=False,
                                 height=160, elem_id="validation")
                viewer = gr.Model3D(label="Mesh", height=320, elem_id="viewer")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")

        def run(*values: Any) -> Iterator[tuple[Any, ...]]:
            yield from _watch(studio, list(values))

        def show_config(label: str) -> list[Any]:
            return _placeholders(studio, label)

        recipe.change(show_config, recipe, numbers)
        page.load(show_config, recipe, numbers)
        # Many pages may watch their jobs at once; the job queue, not Gradio's, serializes the runs.
        # The viewer is cleared first and filled after the watch ends: Gradio's 3D viewer shows no
        # mesh that arrives as one of a streaming event's updates.
        glb = gr.State(None)
        start.click(lambda: None, None, viewer).then(
            run, [recipe, prompt, negative, extra, upload, *numbers], [status, image, files, glb],
            concurrency_limit=None).then(lambda path: path, glb, viewer)
    return page


def launch(page: gr.Blocks, host: str, port: int, share: bool, max_upload_mb: float, runs_dir: Path) -> None:
    """Serve until Ctrl-C or SIGTERM. Gradio itself refuses uploads over the limit before storing them."""
    page.queue(default_concurrency_limit=None).launch(
        server_name=host, server_port=port, share=share, max_file_size=f"{max_upload_mb:g}mb",
        allowed_paths=[str(runs_dir)], show_error=True)
