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
    # seed_resize_from_h / _w (A1111's "resize seed from") are not supported: ignored like any unknown key.
    subseed: int = Field(-1, description="Variation seed; -1: random. Image i of a call uses subseed + i.")
    subseed_strength: float = Field(
        0.0, description="Variation strength 0-1: 0 = the seed's image; over 0 every image keeps the seed"
    )
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
    # A1111's hires fix (txt2img; img2img ignores these, as A1111 does).
    enable_hr: bool = Field(False, description="hires fix: a second pass on the upscaled first one")
    hr_scale: float = Field(2.0, description="upscale factor 1-4 (Size stays the first pass's)")
    hr_resize_x: int = Field(0, description="target width instead of hr_scale; 0: from the scale or the aspect")
    hr_resize_y: int = Field(0, description="target height instead of hr_scale; 0: from the scale or the aspect")
    hr_upscaler: str | None = Field(None, description='"Latent" (default), "Latent (nearest)" or one of /upscalers')
    hr_second_pass_steps: int = Field(0, description="second pass steps; 0: as many as steps")
    denoising_strength: float | None = Field(None, description="the second pass's strength 0-1; null: 0.7")
    alwayson_scripts: dict[str, Any] | None = Field(
        None,
        description='ControlNet extension units: {"controlnet": {"args": [{"model", "image" (base64), "module", '
        '"weight", "guidance_start", "guidance_end", "resize_mode", "threshold_a", "threshold_b"}]}}; '
        "other scripts are ignored",
    )

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


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's img2img: txt2img's fields plus an init image and, for inpainting, a mask."""

    init_images: list[str] = Field(description="one image, base64 (raw or a data: URL)")
    denoising_strength: float = Field(0.75, description="0 keeps the init image, 1 repaints it all")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale")
    mask: str | None = Field(None, description="base64 mask of the init image's size: white = repaint")
    mask_blur: int = 4
    inpainting_fill: int = Field(0, description="masked content: 0 fill, 1 original")
    inpaint_full_res: bool = Field(True, description="only masked: repaint the mask's box at full size")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part instead")
    include_init_images: bool = Field(False, description="echo init_images and mask in parameters")

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a red star <lora:style:0.8>",
                    "init_images": ["iVBORw0KGgoAAAANSUhEUgAA..."],
                    "denoising_strength": 0.6,
                    "seed": 7,
                    "steps": 20,
                    "width": 512,
                    "height": 512,
                }
            ]
        },
    )


class Txt2ImgResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "images": ["iVBORw0KGgoAAAANSUhEUgAA..."],
                    "parameters": {"prompt": "a red star", "seed": 7},
                    "info": '{"seed": 7, "all_seeds": [7], "width": 512, "height": 512, "sampler_name": "Euler a"}',
                }
            ]
        }
    )

    images: list[str] | None = Field(None, description="raw base64 PNGs with the A1111 parameters chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, …")


PROGRESS_STATE_EXAMPLE = {
    "skipped": False,
    "interrupted": False,
    "job": "generate",
    "job_count": 1,
    "job_timestamp": "20261201120000",
    "job_no": 0,
    "sampling_step": 6,
    "sampling_steps": 20,
}


class ProgressState(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [PROGRESS_STATE_EXAMPLE]})

    skipped: bool
    interrupted: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int
    device: str | None = None  # not A1111's: the device (--devices) running the generation; None when idle


class ProgressResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "progress": 0.3,
                    "eta_relative": 2.1,
                    "state": PROGRESS_STATE_EXAMPLE,
                    "current_image": None,
                    "textinfo": None,
                }
            ]
        }
    )

    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "title": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
                    "model_name": "v1-5-pruned-emaonly",
                    "hash": "6ce0161689",
                    "sha256": "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                    "filename": "/models/v1-5-pruned-emaonly.safetensors",
                    "config": None,
                }
            ]
        }
    )

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "DPM++ 2M", "aliases": [], "options": {}}]})

    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": -1, "need_inner_model": False}
            ]
        }
    )

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class UpscalerItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": None}]
        }
    )

    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Latent"}]})

    name: str


class SDVaeItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model_name": "vae-ft-mse", "filename": "/models/vae-ft-mse.safetensors"}]}
    )

    model_name: str
    filename: str


class LoraItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "style",
                    "alias": "style",
                    "path": "/loras/style.safetensors",
                    "metadata": {"ss_base_model_version": "sd_v1"},
                }
            ]
        }
    )

    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"loaded": {}, "skipped": {}}]})

    loaded: dict[str, Any]
    skipped: dict[str, Any]


class ScriptsList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"txt2img": [], "img2img": []}]})

    txt2img: list[str]
    img2img: list[str]


class PNGInfoRequest(A1111Request):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA..."}]}
    )

    image: str = Field(description="a PNG as base64, raw or as a data: URL")


class PNGInfoResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "info": "a red star\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 512x512",
                    "items": {"parameters": "a red star\nSteps: 20, ..."},
                    "parameters": {"prompt": "a red star", "steps": 20, "seed": 7},
                }
            ]
        }
    )

    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class MemoryResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ram": {"free": 8000000000, "used": 8000000000, "total": 16000000000},
                    "cuda": {"error": "running on cpu: no CUDA memory"},
                }
            ]
        }
    )

    ram: dict[str, Any]
    cuda: dict[str, Any]


class ErrorResponse(BaseModel):
    """A1111's error body."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "UserError", "detail": "", "body": "", "errors": "Steps must be between 1 and 150; got 999."}
            ]
        }
    )

    error: str
    detail: Any = ""
    body: Any = ""
    errors: str


# --- documented replies of the routes whose reply has no model of its own (a free dict, or null) ---

OPTIONS_EXAMPLE = {
    "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "samples_format": "png",
}


def json_reply(example: Any, description: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a 200 whose JSON has no model: documented by an example."""
    return {200: {"description": description, "content": {"application/json": {"example": example}}}}


# A null reply, as A1111 gives. The example sits in the schema: a null ``example`` on the media type
# would be dropped from /openapi.json (FastAPI leaves out None values).
NULL_REPLY: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Done; the reply is null, as in A1111",
        "content": {"application/json": {"schema": {"type": "null", "examples": [None]}}},
    }
}
OPTIONS_REPLY = json_reply(OPTIONS_EXAMPLE, "The settings A1111 clients read (unknown keys are never an error)")
CMD_FLAGS_REPLY = json_reply(
    {"api": True, "api_auth": True, "model": "runwayml/stable-diffusion-v1-5", "threads": 1},
    "The app's settings by name; secrets are left out",
)
NOT_BUILT_REPLY: dict[int | str, dict[str, Any]] = {501: {"model": ErrorResponse, "description": "Not built yet"}}
