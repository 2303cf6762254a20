"""LoRAs, base models, jobs and GPU memory as plain data for the REST API (``/api/v1``).

Wraps ``GenerationService`` and the job queue; every method returns JSON-able dicts (or None for
an unknown name or id, which the API answers with 404). Never imports gradio or fastapi.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorapg.diffusion.lora_library import LoraInfo
from lorapg.errors import MAX_REF_CHARS, UserError, check_ref_length
from lorapg.hashing import lora_hash
from lorapg.jobs import Job, JobQueue
from lorapg.services.generation import GenerationService

log = logging.getLogger(__name__)

# Metadata keys worth a glance in a listing (kohya's training facts, modelspec's description);
# the full header is on GET /api/v1/loras/{name}.
SUMMARY_KEYS = (
    "ss_base_model_version",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_num_epochs",
    "ss_steps",
    "ss_resolution",
    "ss_output_name",
    "modelspec.title",
    "modelspec.architecture",
    "modelspec.description",
)


def job_view(job: Job, jobs: JobQueue) -> dict[str, Any]:
    """Any job's state as the API shows it (its result object stays in the process)."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "step": job.step,
        "total": job.total,
        "message": job.message,
        "error": job.error,
        "position": jobs.position(job),
        "created_at": job.created_at,
    }


def lora_summary(info: LoraInfo) -> dict[str, Any]:
    try:
        short_hash = lora_hash(info.path)
    except UserError as exc:  # a file replaced or cut short since the scan: listed without a hash
        log.warning("no hash for LoRA %s: %s", info.name, exc)
        short_hash = None
    return {
        "name": info.name,
        "family": info.family,
        "format": info.format,
        "layout": info.layout,
        "trigger_words": list(info.trigger_words),
        "description": info.description,
        "size_bytes": info.size_bytes,
        "hash": short_hash,
        "path": str(info.path),
        "metadata": {key: info.metadata[key] for key in SUMMARY_KEYS if key in info.metadata},
    }


def lora_detail(info: LoraInfo) -> dict[str, Any]:
    return {**lora_summary(info), "metadata": dict(info.metadata)}


class LibraryService:
    """What ``/api/v1`` says about LoRAs, models, jobs and memory, built from the generation service."""

    def __init__(self, generation: GenerationService):
        self.generation = generation
        self.jobs = generation.jobs

    # --- LoRAs ---------------------------------------------------------------------------------

    def loras(self) -> dict[str, Any]:
        """Every readable LoRA (the folder is scanned afresh) and one line per file that is not."""
        listing = self.generation.list_loras()
        return {"loras": [lora_summary(info) for info in listing.loras], "problems": list(listing.problems)}

    def lora(self, name: str) -> dict[str, Any] | None:
        """One LoRA by its listed name, with its whole metadata header; None when there is none."""
        check_ref_length(name, "name")
        found = next((info for info in self.generation.list_loras().loras if info.name == name), None)
        return lora_detail(found) if found is not None else None

    # --- base models ---------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        status = self.generation.model_status()
        configured = self.generation.settings.model
        return [
            {
                "ref": ref,
                "name": Path(ref).name if Path(ref).exists() else ref,
                "loaded": status.loaded and ref == status.ref,
                "configured": ref == configured,
            }
            for ref in self.generation.model_choices()
        ]

    def current_model(self) -> dict[str, Any]:
        status = self.generation.model_status()
        load = self.generation.loading_job()
        return {
            "ref": status.ref,
            "family": status.family,
            "native_size": status.native_size,
            "loaded": status.loaded,
            "load_job": job_view(load, self.jobs) if load is not None else None,
        }

    def load_model(self, ref: str) -> dict[str, Any]:
        """Queue loading ``ref``; a ref that cannot be loaded fails here, before the queue."""
        if not isinstance(ref, str) or not ref.strip():
            raise UserError("model: give a model to load (a ref from GET /api/v1/models, a hub id or a path).")
        if len(ref) > MAX_REF_CHARS:
            raise UserError(f"model: at most {MAX_REF_CHARS} characters; check what was pasted.")
        try:
            job = self.generation.submit_load_model(ref)
        except UserError as exc:
            raise UserError(f"model: {exc}") from None
        return {"job_id": job.id, "status": job.status, "position": self.jobs.position(job)}

    # --- jobs ----------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            job = self.jobs.get(job_id)
        except UserError:
            return None
        return job_view(job, self.jobs)

    # --- workers -------------------------------------------------------------------------------

    def workers(self) -> dict[str, Any]:
        """Every generation worker (local devices, then Ray workers) with its model and load."""
        return {"workers": [asdict(worker) for worker in self.generation.worker_status()]}

    # --- GPU memory ----------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        return self._memory(freed=None)

    def free_memory(self) -> dict[str, Any]:
        freed = self.generation.free_gpu_memory().freed
        return self._memory(freed=list(freed) if freed is not None else [])

    def _memory(self, freed: list[str] | None) -> dict[str, Any]:
        status = self.generation.memory_status()
        residency = self.generation.engine.residency
        managed = None
        if residency is not None:  # CUDA: the residency manager's budget and who holds the GPU
            managed = {
                "policy": residency.policy,
                "budget_bytes": residency.budget_bytes,
                "used_bytes": residency.used_bytes,
                "models": residency.status(),
            }
        return {"device": status.device, "residency": managed, "report": status.report, "freed": freed}
