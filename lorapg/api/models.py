"""Request and response models of ``/sdapi/v1`` with AUTOMATIC1111 1.10's field names.

Requests ignore fields they do not know (``extra="ignore"``): clients send A1111's whole request
(hires fix, scripts, SillyTavern's ``url`` and ``auth``), and an unknown key is never an error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class A1111Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(A1111Request):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random; the images of a call use consecutive seeds")
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = Field(None, examples=["DPM++ 2M"])
    sampler_index: str | None = Field("Euler", description="old name of sampler_name, used when it is empty")
    scheduler: str | None = Field(None, examples=["automatic", "karras"])
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red star <lora:style:0.8>",
                    "seed": 7,
                    "steps": 20,
                    "width": 512,
                    "height": 512,
                    "sampler_name": "Euler a",
                }
            ]
        },
    )


class Txt2ImgResponse(BaseModel):
    images: list[str] | None = Field(None, description="raw base64 PNGs with the A1111 parameters chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, …")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any]
    skipped: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


class PNGInfoRequest(A1111Request):
    image: str = Field(description="a PNG as base64, raw or as a data: URL")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ErrorResponse(BaseModel):
    """A1111's error body."""

    error: str
    detail: Any = ""
    body: Any = ""
    errors: str
