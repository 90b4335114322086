"""The app without its page: turns a form into a queued job and a job into what the page shows."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from webapp.jobs import (Job, JobQueue, JobState, exported_files, latest_record, latest_validation,
                         planned_iterations)
from webapp.plan import RequestError, RunRequest, ServerSettings, plan_steps
from webapp.recipes import Recipe, shipped_recipes
from webapp.uploads import UploadError, UploadLimits, accept_upload


@dataclass(frozen=True)
class AppOptions:
    server: ServerSettings
    limits: UploadLimits = UploadLimits()
    slots: tuple[str | None, ...] = (None,)          # one worker per entry: a GPU index, or None
    recipes: tuple[Recipe, ...] = field(default_factory=lambda: tuple(shipped_recipes()))


@dataclass
class JobView:
    """One refresh of the page."""
    status: str
    image: Path | None = None
    glb: Path | None = None
    files: list[Path] = field(default_factory=list)
    done: bool = False


class Studio:
    def __init__(self, opts: AppOptions, queue: JobQueue | None = None) -> None:
        self.opts = opts
        self.recipes = {r.label: r for r in opts.recipes}
        self.queue = queue or JobQueue(list(opts.slots))
        # Uploads live in a private temporary folder, one subfolder per job, removed on exit.
        self.upload_root = Path(tempfile.mkdtemp(prefix="fantasia3d-uploads-"))

    def submit(self, req: RunRequest, upload: str | Path | None = None) -> Job:
        """Check the form and the upload, then queue the job. RequestError/UploadError say why not."""
        recipe = self.recipes.get(req.recipe)
        if recipe is None:
            raise RequestError(f"unknown config '{req.recipe}': pick one of the shipped configs")
        job = Job(steps=[], folder=self.opts.server.runs_dir)
        job.folder = self.opts.server.runs_dir / job.id
        try:
            if upload:
                job.scratch = self.upload_root / job.id
                req.mesh = accept_upload(upload, job.scratch, self.opts.limits)
            job.steps = plan_steps(req, recipe, job.folder, self.opts.server)
        except (RequestError, UploadError):
            if job.scratch is not None:
                shutil.rmtree(job.scratch, ignore_errors=True)   # a refused job keeps nothing
            raise
        self.queue.submit(job)
        return job

    def view(self, job: Job) -> JobView:
        if job.state is JobState.QUEUED:
            return JobView(self._queued_text(job))
        run_dir = job.step.run_dir
        image = latest_validation(run_dir)
        if job.state is JobState.FAILED:
            return JobView(f"failed ({self._step_text(job)})\n{job.error}", image, done=True)
        if job.state is JobState.FINISHED:
            files = exported_files(run_dir)
            glb = next((p for p in files if p.suffix == ".glb"), None)
            return JobView(f"finished (job {job.id})\n{self._progress_text(job)}", image, glb, files, done=True)
        return JobView(f"running ({self._step_text(job)})\n{self._progress_text(job)}", image)

    def _queued_text(self, job: Job) -> str:
        position = self.queue.position(job)
        return (f"queued: position {position} in line ({self.queue.running()} running; runs start one at a time "
                "per GPU)") if position else "starting"

    @staticmethod
    def _step_text(job: Job) -> str:
        step = job.step
        return f"step {job.step_index + 1}/{len(job.steps)}: {step.name}, {step.config.name}"

    @staticmethod
    def _progress_text(job: Job) -> str:
        record, total = latest_record(job.step.run_dir), planned_iterations(job.step.run_dir)
        if record is None:
            return f"preparing (model, SDF pretraining)... {job.output.last_line()}".rstrip()
        return (f"iteration {record['it']}/{total or '?'} ({record.get('stage', '')}), "
                f"loss {record.get('loss', float('nan')):.4g}")

    def close(self) -> None:
        self.queue.shutdown()
        shutil.rmtree(self.upload_root, ignore_errors=True)


__all__ = ["AppOptions", "JobView", "RequestError", "RunRequest", "ServerSettings", "Studio", "UploadError"]
