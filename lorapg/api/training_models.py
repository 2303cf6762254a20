"""Request and reply models of ``/api/v1/training`` (see lorapg/api/training.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

RUN_EXAMPLE = {
    "job_id": "3f9c2a1b7d4e",
    "name": "zqx_fox",
    "dataset": "zqx_fox-1a2b3c4d5e",
    "status": "running",
    "epoch": 2,
    "epochs": 10,
    "step": 14,
    "total_steps": 60,
    "loss": 0.1132,
    "percent": 23.3,
    "eta_seconds": 41.0,
    "message": "epoch 2/10, step 14/60, loss 0.1132, 1.12 steps/s, ETA 41s",
    "created_at": 1764612000.0,
    "started_at": 1764612001.5,
    "finished_at": None,
}


class TrainingStarted(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "3f9c2a1b7d4e",
                    "status": "queued",
                    "estimated_duration_seconds": 95.0,
                    "dataset": "zqx_fox-1a2b3c4d5e",
                }
            ]
        }
    )

    job_id: str
    status: str = Field(description="queued, running, done, error or cancelled")
    estimated_duration_seconds: float = Field(description="From the planned steps and a GPU's time per step")
    dataset: str = Field(description="The dataset the run trains on (made from the upload, or the one named)")


class TrainingRunSummary(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [RUN_EXAMPLE]})

    job_id: str
    name: str = Field(description="The LoRA's name")
    dataset: str
    status: str = Field(description="queued, running, done, error or cancelled")
    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float | None
    percent: float
    eta_seconds: float | None
    message: str
    created_at: float = Field(description="Unix time the run was queued")
    started_at: float | None = Field(description="Unix time the run began; null while queued")
    finished_at: float | None = Field(description="Unix time the run ended; null until then")


class LossPoint(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"step": 14, "loss": 0.1132}]})

    step: int
    loss: float


class TrainingRunDetail(TrainingRunSummary):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **RUN_EXAMPLE,
                    "losses": [{"step": 1, "loss": 0.152}, {"step": 2, "loss": 0.131}],
                    "sample_urls": ["/api/v1/training/3f9c2a1b7d4e/samples/1.png"],
                    "lora_name": None,
                    "lora_path": None,
                    "checkpoint": "models/training/zqx_fox/checkpoints/step-00000012",
                    "resumed_from": 0,
                    "error": None,
                }
            ]
        }
    )

    losses: list[LossPoint]
    sample_urls: list[str] = Field(description="One per sample image, oldest first")
    lora_name: str | None = Field(description="Set once the LoRA is written")
    lora_path: str | None
    checkpoint: str | None = Field(description="The latest checkpoint (a cancelled run resumes from it)")
    resumed_from: int = Field(description="The step a resumed run continued from (0: a fresh run)")
    error: str | None


class TrainingPresetItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"name": "character", "description": "A person or creature ..."}]}
    )

    name: str
    description: str


# The stream of GET /api/v1/training/{job_id}/events, as it appears on the wire.
EVENTS_EXAMPLE = (
    "event: progress\n"
    'data: {"status": "running", "epoch": 1, "epochs": 2, "step": 3, "total_steps": 6, "loss": 0.12, '
    '"percent": 50.0, "eta_seconds": 2.5, "message": "epoch 1/2, step 3/6, ..."}\n\n'
    "event: progress\n"
    'data: {"status": "running", ..., "sample_url": "/api/v1/training/3f9c2a1b7d4e/samples/1.png"}\n\n'
    "event: complete\n"
    'data: {"lora_name": "zqx_fox", "lora_path": "models/loras/zqx_fox.safetensors", "steps": 6, '
    '"resumed_from": 0}\n\n'
)
