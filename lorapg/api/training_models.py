"""Request and reply models of ``/api/v1/training`` (see lorapg/api/training.py)."""

from __future__ import annotations

from typing import Any

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
    measured_estimate_seconds: float | None = Field(
        None, description="From this machine's measured speed; null until a run of this model has finished here"
    )
    estimate: str = Field("", description="The estimate in words, with what it is based on")


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


HISTORY_EXAMPLE = {
    "id": "3f9c2a1b7d4e",
    "name": "zqx_fox",
    "status": "done",
    "dataset": "zqx_fox-1a2b3c4d5e",
    "created_at": 1764612000.0,
    "started_at": 1764612001.5,
    "finished_at": 1764612097.0,
    "duration_seconds": 95.5,
    "step": 60,
    "total_steps": 60,
    "final_loss": 0.0931,
    "lora_path": "models/loras/zqx_fox.safetensors",
    "epoch_loras": ["models/loras/zqx_fox_epochs/zqx_fox-e0001.safetensors"],
    "sample_urls": ["/api/v1/training/runs/3f9c2a1b7d4e/samples/1.png"],
    "error": None,
    "config": {"name": "zqx_fox", "trigger": "zqx_fox", "epochs": 10, "unet_lr": 0.0001},
}


class RunHistoryItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [HISTORY_EXAMPLE]})

    id: str = Field(description="The run's id (its job id)")
    name: str = Field(description="The LoRA's name")
    status: str = Field(description="queued, running, done, failed or cancelled")
    dataset: str
    created_at: float = Field(description="Unix time the run was queued")
    started_at: float | None
    finished_at: float | None
    duration_seconds: float | None = Field(description="From start to end; null until it ended")
    step: int
    total_steps: int
    final_loss: float | None
    lora_path: str | None
    epoch_loras: list[str] = Field(description="The per-epoch LoRA files")
    sample_urls: list[str] = Field(description="The kept per-epoch samples, first epoch first")
    error: str | None = Field(description="Why it failed (interrupted: the app stopped during the run)")
    config: dict[str, Any] = Field(description="Every training setting of the run")


class RunHistoryDetail(RunHistoryItem):
    losses: list[LossPoint]


class RunQueueBody(BaseModel):
    """Queue a run on a dataset, or train again from a run of the history with ``settings`` changed."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "zqx_fox", "trigger_word": "zqx_fox", "dataset": "foxes", "preset": "character"},
                {"again_from": "3f9c2a1b7d4e", "settings": {"unet_lr": 0.0002}},
            ]
        },
    )

    name: str = Field("", max_length=200, description="The LoRA's name (train again: a free name when empty)")
    trigger_word: str = Field("", max_length=200)
    dataset: str = Field("", max_length=200, description="An existing dataset's name")
    preset: str = Field("", max_length=100)
    settings: dict[str, Any] = Field(default_factory=dict, description="Training settings (TrainConfig fields)")
    again_from: str = Field("", max_length=100, description="A run id: copy its settings")


class ComparedSample(BaseModel):
    label: str
    url: str


class ComparedRun(BaseModel):
    id: str
    name: str
    status: str
    losses: list[LossPoint]
    samples: list[ComparedSample]


_COMPARED = (("3f9c2a1b7d4e", "zqx_fox", 0.131), ("8e1d0c5b2a97", "zqx_fox-2", 0.118))


class RunComparison(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "runs": [
                        {
                            "id": run_id,
                            "name": name,
                            "status": "done",
                            "losses": [{"step": 1, "loss": 0.152}, {"step": 2, "loss": loss}],
                            "samples": [{"label": "epoch 1", "url": f"/api/v1/training/runs/{run_id}/samples/1.png"}],
                        }
                        for run_id, name, loss in _COMPARED
                    ]
                }
            ]
        }
    )

    runs: list[ComparedRun] = Field(description="In the order the ids were given")


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
