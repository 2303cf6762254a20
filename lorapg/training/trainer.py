"""The LoRA trainer: diffusers + peft on SD 1.x / 2.x, SDXL, Flux.1 and SD 3.5, run by ``accelerate``.

Flux.1 and SD 3.5 train their transformer with a flow-matching loss; what differs for them lives in
``lorapg.training.flow_matching`` (``_RunState.flow``), the rest of the run is shared.

One ``Trainer.run()`` is one training run, in these steps (the numbered comments in ``run``):

1. load a training copy of the base model (fp32 weights, separate from the inference pipeline);
2. read the dataset, assign aspect-ratio buckets;
3. freeze the models and place them on the accelerator's device (frozen weights in the mixed
   precision); cache VAE latents (on disk, per resolution);
4. add LoRA adapters (UNet, optionally the text encoder(s)); optimizer, LR schedule;
5. resume from the last checkpoint when there is one; write the run's config.toml;
6. the loop: noise, timesteps, the UNet's prediction, (min-SNR weighted) MSE, one optimizer step;
   progress after every step, cancel checked between steps, a checkpoint and a sample image per epoch;
7. export the kohya-format LoRA into the LoRA folder.

What the steps share travels in one ``_RunState``.

Randomness the result depends on (batch order, noise, timesteps) is a function of the run's seed and
the position in the run (epoch, batch, sample), so a resumed run reaches the uninterrupted run's
weights, and N processes (``accelerate launch``, see ``distributed``) train the LoRA one process
trains with N times the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from lorapg.atomic_files import atomic_write_bytes, atomic_write_text
from lorapg.diffusion.families import SDXL, is_transformer_family
from lorapg.errors import UserError
from lorapg.training import checkpoints, distributed, export
from lorapg.training.caption_variation import step_caption
from lorapg.training.config import TrainConfig, to_toml
from lorapg.training.cropping import (
    Detector,
    Focus,
    FocusPoints,
    Size,
    assign_bucket,
    bucket_step,
    buckets_for,
    choose_focus,
    crop_to_plan,
    make_buckets,  # noqa: F401 (moved to cropping; still importable from here)
    open_rgb,
    oriented_size,
    plan_crop,
)
from lorapg.training.dataset import Dataset
from lorapg.training.flow_matching import FlowTraining, warn_unused_flow_settings
from lorapg.training.validation import DEFAULT_MAX_PIXELS, ImageCheck, ValidationReport

log = logging.getLogger(__name__)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py targets
CONV_TARGETS = ["conv1", "conv2"]  # every ResNet block's two 3×3 convolutions (kohya's LoCon)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Settings a checkpoint must share with the run that resumes it (epochs and max_steps may grow).
RESUME_KEYS = (
    "model",
    "images",
    "regularization_images",
    "prior_loss_weight",
    "trigger",
    "rank",
    "alpha",
    "train_text_encoder",
    "train_conv",
    "repeats",
    "batch_size",
    "resolution",
    "bucketing",
    "seed",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "guidance_scale",
)


@dataclass
class TrainProgress:
    phase: str  # "prepare", "train", "sample", "done"
    epoch: int = 0  # 1-based epoch in progress
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    steps_per_s: float = 0.0
    eta_s: float | None = None
    message: str = ""
    sample: Image.Image | None = None

    def describe(self) -> str:
        if self.phase != "train":
            return self.message
        eta = f", ETA {format_seconds(self.eta_s)}" if self.eta_s is not None else ""
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        return (
            f"epoch {self.epoch}/{self.epochs}, step {self.step}/{self.total_steps}{loss}, "
            f"{self.steps_per_s:.2f} steps/s{eta}"
        )


@dataclass
class TrainResult:
    name: str
    lora_path: Path | None  # None when cancelled before the end
    family: str
    steps: int
    total_steps: int
    cancelled: bool
    checkpoint: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    epoch_loras: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    resumed_from: int = 0
    steps_per_s: float = 0.0
    config_path: Path | None = None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


# --- images and buckets ---------------------------------------------------------------------------


@dataclass
class TrainImage:
    path: Path
    sha256: str
    caption: str  # with the trigger word
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int] = (0, 0)  # (width, height) trained at
    crop: tuple[int, int] = (0, 0)  # (top, left) of the crop, in resized pixels (SDXL time ids)
    loss_weight: float = 1.0  # regularization images weigh prior_loss_weight
    # What the crop centres on (lorapg.training.cropping): a focus point set by hand or a face; None: the middle.
    focus: Focus | None = None
    focus_source: str = "center"


def build_caption(trigger: str, caption: str) -> str:
    """The trigger word first (kohya's ``keep_tokens`` convention), then the image's own caption.

    A caption that already uses the trigger as a word ("a red ring on a blue background" for trigger
    "ring") is kept as written: it is the prompt people will type, and training on a different
    phrasing measurably weakens the LoRA on that prompt.
    """
    caption = " ".join((caption or "").split())
    if not caption:
        return trigger
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"


def load_pixels(item: TrainImage) -> torch.Tensor:
    """Resize to cover the bucket, crop the box the crop preview shows (lorapg.training.cropping);
    ``[-1, 1]`` CHW float32. Records the crop offset."""
    image = open_rgb(item.path)
    plan = plan_crop(image.size, item.bucket, item.focus, item.focus_source)
    item.crop = plan.crop
    width, height = item.bucket
    image = crop_to_plan(image, plan)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def epoch_batches(
    groups: dict[tuple[int, int], list[int]], repeats: int, batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The batches of one epoch: each bucket's images (× repeats) shuffled, chunked, then batches shuffled.

    Seeded by (seed, epoch) alone, so a resumed run rebuilds exactly the batches it was in.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = [index for index in groups[bucket] for _ in range(repeats)]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


# --- the plan: which images train, in which buckets, for how many steps -----------------------------
# Module functions, so the duration estimate counts a run's steps exactly as the trainer will.


def trained_checks(
    dataset: Dataset, report: ValidationReport, drop_near_duplicates: bool
) -> list[tuple[ImageCheck, Size]]:
    """The images of ``report`` a run trains (invalid ones, and near duplicates when asked, left
    out), each with the size it trains as (EXIF orientation applied, as the crop preview sees it)."""
    return [
        (check, oriented_size(dataset.folder / check.file, (check.width, check.height)))
        for check in report.trainable(drop_near_duplicates=drop_near_duplicates)
    ]


def planned_sizes(config: TrainConfig, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> list[Size]:
    """The sizes of the images a run of ``config`` trains, in the trainer's order: its images, then
    its regularization images. Refuses (``UserError``) a folder with nothing to train on."""
    folders = [config.images] + ([config.regularization_images] if config.regularization_images else [])
    sizes: list[Size] = []
    for folder in folders:
        dataset = Dataset(Path(folder), max_image_pixels)
        report = dataset.require_trainable()
        sizes += [size for _, size in trained_checks(dataset, report, config.drop_near_duplicates)]
    return sizes


# accelerate's mixed precision -> the dtype of the frozen weights ("no": fp32).
_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def training_geometry(pipe, resolution: int = 0) -> tuple[int, int]:
    """The training side (the model's native size unless ``resolution``) and the multiple bucket sides use."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(pipe.unet.config.sample_size * vae_scale)
    resolution = resolution or native
    # Sides must divide by the VAE factor × the UNet's downsamplings; real models: kohya's 64 px.
    multiple = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return resolution, bucket_step(resolution, multiple)


def bucket_groups(sizes: Sequence[Size], buckets: list[Size]) -> dict[Size, list[int]]:
    """Bucket -> the indices of the images (of ``sizes``) that train in it."""
    groups: dict[Size, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(assign_bucket(size, buckets), []).append(index)
    return groups


def planned_steps(
    groups: dict[Size, list[int]], repeats: int, global_batch_size: int, epochs: int, max_steps: int
) -> tuple[int, int]:
    """(steps per epoch, total steps): every bucket's last batch may be short, so each rounds up."""
    # The count does not depend on the shuffle: any seed and epoch give it.
    steps_per_epoch = len(epoch_batches(groups, repeats, global_batch_size, 0, 0))
    total = epochs * steps_per_epoch
    return steps_per_epoch, min(total, max_steps) if max_steps else total


# --- the trainer ----------------------------------------------------------------------------------


@dataclass
class _RunState:
    """What one run carries from step to step; ``Trainer.run``'s steps fill it in, in order.

    ``unet`` is the denoiser the loop calls, a UNet or (Flux.1, SD 3.5) a transformer (the
    accelerator-prepared one from step 4 on); ``trained`` maps checkpoint/export prefixes to the
    modules that carry LoRA weights, as built.
    """

    # 1. The model.
    started_at: float  # wall-clock start, for the LoRA's metadata
    pipe: Any  # the training copy; its VAE encodes latents, the pipeline draws the samples
    family: str
    unet: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    resolution: int
    step_px: int  # bucket sides are multiples of it
    flow: FlowTraining | None = None  # Flux.1 / SD 3.5: the flow-matching parts; None for SD's UNets
    # 2. The data.
    items: list[TrainImage] = field(default_factory=list)
    groups: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # bucket -> indices into items
    # 3. Devices and latents.
    accelerator: Any = None
    weight_dtype: torch.dtype = torch.float32
    latents_cache: list[torch.Tensor] | None = None  # per item, when cache_latents
    # 4. Adapters and optimization.
    trained: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    optimizer_name: str = ""
    lr_scheduler: Any = None
    noise_scheduler: Any = None
    global_batch_size: int = 1  # batch_size × processes: one optimizer step trains this many samples
    steps_per_epoch: int = 1
    total_steps: int = 0
    epochs: int = 0
    # 5.-7. Where the run is.
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    result: TrainResult | None = None
    text_cache: dict[str, tuple] = field(default_factory=dict)  # caption -> embeddings (frozen encoders)
    session_start: float = 0.0
    session_steps: int = 0  # steps taken by this process (a resumed run's rate counts only these)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def steps_per_s(self) -> float:
        return self.session_steps / max(time.perf_counter() - self.session_start, 1e-9)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        *,
        lora_dir: Path,
        work_dir: Path,
        device: torch.device | None = None,
        allow_pickle: bool = False,
        single_file_config: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        on_progress: Callable[[TrainProgress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        face_detector: Detector | None = None,
        default_quantize: str = "none",
    ):
        """``face_detector``: finds faces for ``face_crop`` (default: OpenCV's Haar cascade).
        ``default_quantize``: the app's quantize setting, for a run whose config leaves ``quantize`` empty."""
        self.config = config
        self.default_quantize = default_quantize
        self.face_detector = face_detector
        self.lora_dir = Path(lora_dir)
        self.work_dir = Path(work_dir)
        self.requested_device = device
        self.allow_pickle = allow_pickle
        self.single_file_config = single_file_config
        self.max_image_pixels = max_image_pixels
        # Several processes train one run (accelerate launch): the main one alone reports and writes.
        self.main = distributed.is_main_process()
        self.on_progress = (on_progress if self.main else None) or (lambda progress: None)
        self.should_cancel = should_cancel or (lambda: False)

    @property
    def lora_path(self) -> Path:
        return self.lora_dir / f"{self.config.name}.safetensors"

    @property
    def epochs_dir(self) -> Path:
        return self.lora_dir / f"{self.config.name}_epochs"

    def _status(self, message: str) -> None:
        if self.main:
            log.info(message)
        self.on_progress(TrainProgress("prepare", message=message))

    # --- the run, step by step ------------------------------------------------------------------

    def run(self) -> TrainResult:
        """One training run, in the order of the module docstring; the result of a cancelled run has no LoRA."""
        started_at = time.time()
        self.work_dir.mkdir(parents=True, exist_ok=True)

        # 1. Load a training copy of the base model.
        run = self._load_models(started_at)

        # 2. Read the dataset; assign aspect-ratio buckets.
        self._read_data(run)

        # 3. Freeze the models and place them on the accelerator's device; cache the VAE latents.
        self._place_models(run)
        if self.config.cache_latents:
            run.latents_cache = self._cache_latents(run)
        if run.flow is not None:
            self._cache_flow_text(run)

        # 4. Add the LoRA adapters; optimizer, LR schedule, noise schedule.
        self._add_adapters(run)
        self._prepare_optimization(run)

        # 5. Resume from the last checkpoint when there is one; record the run's config.
        self._resume_or_start(run)

        # Before the models go: several processes share a gloo process group that must end first.
        def release() -> None:
            self._release_wrappers(run)

        trained = False  # past the run's last collective: a failure can still be agreed on with the others
        try:
            # 6. The loop, until the last step or a cancel.
            completed = self._train(run)
            trained = True
            if completed:
                # 7. Export the LoRA.
                self._export_final(run)
        except BaseException:
            # Tell the other processes (or close the group on them), so that none waits in a barrier for good.
            distributed.end_after_error(run.accelerator, release, after_last_collective=trained)
            raise
        distributed.end_process_group(run.accelerator, release)
        return run.result

    # --- 1. the model ---------------------------------------------------------------------------

    def _load_models(self, started_at: float) -> _RunState:
        from lorapg.diffusion.model_source import resolve_model_source
        from lorapg.diffusion.pipeline_loader import load_pipeline

        source = resolve_model_source(self.config.model, allow_pickle=self.allow_pickle)
        dtype = self._load_dtype(source)
        self._status(f"Loading a training copy of {source.display_name} ({str(dtype).removeprefix('torch.')})…")
        plan, app_wide = self._quantize_plan()
        # Its own copy on the CPU: the inference pipeline's (half-precision) modules are never trained.
        pipe, family = load_pipeline(
            source,
            torch.device("cpu"),
            dtype,
            single_file_config=self.single_file_config,
            quantize=plan,
            app_wide_quantize=app_wide,
            training=True,
        )
        if is_transformer_family(family):
            flow = FlowTraining(pipe, family, self.config)
            resolution, step_px = flow.geometry(self.config.resolution)
            return _RunState(
                started_at, pipe, family, pipe.transformer, flow.text_encoders(), [], resolution, step_px, flow
            )
        warn_unused_flow_settings(self.config, family)
        sdxl = family == SDXL
        resolution, step_px = self._training_resolution(pipe)
        return _RunState(
            started_at=started_at,
            pipe=pipe,
            family=family,
            unet=pipe.unet,
            text_encoders=[pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else []),
            tokenizers=[pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else []),
            resolution=resolution,
            step_px=step_px,
        )

    def _quantize_plan(self):
        """``quantize = "nf4"``: the frozen transformer and T5 in NF4 (quantized on the CPU while loading,
        where the training copy loads; moved to the device as they are). The LoRA added later trains in fp32.

        Returns the plan and whether it is the app's setting (an empty ``quantize``), which SD 1.x/SDXL
        runs skip; the run's own ``quantize`` is a request, refused for them.
        """
        from lorapg.diffusion.quantization import FP8, NONE, parse_plan

        if self.config.quantize:
            return parse_plan(self.config.quantize), False
        if self.default_quantize == FP8:  # training offers none and nf4 only
            log.info("the app's quantize=fp8 does not apply to training; this run's base stays unquantized")
            return parse_plan(NONE), True
        return parse_plan(self.default_quantize), True

    def _load_dtype(self, source) -> torch.dtype:
        """fp32 for SD (the UNet path keeps fp32 until placement; its VAE stays fp32); Flux.1 / SD 3.5 in
        the run's weight dtype, as their frozen weights train: FLUX.1-dev in fp32 is ~67 GB of RAM.
        On the CPU that dtype is fp32 anyway (no mixed precision there, see ``_precision``)."""
        from lorapg.diffusion.model_source import HUB
        from lorapg.diffusion.pipeline_loader import download_from_hub
        from lorapg.training.presets import guess_family

        weight_dtype = _WEIGHT_DTYPES.get(self._precision()[1], torch.float32)
        if weight_dtype == torch.float32:
            return weight_dtype
        family = source.family or guess_family(source.ref)
        if family is None and source.kind == HUB:
            # Download first (load_pipeline then finds it in the cache) so its model_index.json names the family.
            family = guess_family(download_from_hub(source.ref, torch.device("cpu")))
        return weight_dtype if is_transformer_family(family) else torch.float32

    def _training_resolution(self, pipe) -> tuple[int, int]:
        return training_geometry(pipe, self.config.resolution)

    # --- 2. data --------------------------------------------------------------------------------

    def _read_data(self, run: _RunState) -> None:
        run.items = self._read_dataset()
        buckets = buckets_for(run.resolution, run.step_px, self.config.bucketing)
        run.groups = bucket_groups([item.size for item in run.items], buckets)
        for bucket, indices in run.groups.items():
            for index in indices:
                run.items[index].bucket = bucket
        for item in run.items:
            load_pixels_crop_only(item)  # the crop box is known before any pixel is read
        config = self.config
        distributed.check_dataset_fits(len(run.items) * config.repeats, config.batch_size, distributed.world_size())

    def _read_dataset(self) -> list[TrainImage]:
        items = self._read_folder(self.config.images, "Image folder", self.config.trigger)
        if self.config.regularization_images:
            # Captions as written: the trigger must not leak into the images that teach "everything else".
            items += self._read_folder(
                self.config.regularization_images,
                "Regularization folder",
                None,
                loss_weight=self.config.prior_loss_weight,
            )
        return items

    def _read_folder(self, folder: str, what: str, trigger: str | None, loss_weight: float = 1.0) -> list[TrainImage]:
        dataset = Dataset(Path(folder), self.max_image_pixels)
        if not dataset.folder.is_dir():
            raise UserError(f"{what} {folder} does not exist.")
        report = dataset.require_trainable()
        for check in report.invalid:
            log.warning("skipping %s: %s", check.file, "; ".join(check.reasons))
        drop = self.config.drop_near_duplicates
        for check in report.near_duplicates:
            action = "left out" if drop else "kept"
            log.warning("near duplicate %s: %s", action, check.near_duplicate_note)
        items = []
        focus_points = FocusPoints(dataset.folder).load()
        for c, size in trained_checks(dataset, report, drop):
            caption = dataset.caption(c.file)
            if trigger is not None:
                caption = build_caption(trigger, caption)
            path = dataset.folder / c.file
            item = TrainImage(path, c.sha256, caption, size, loss_weight=loss_weight)
            self._place_focus(item, focus_points.get(c.file))
            items.append(item)
        return items

    def _place_focus(self, item: TrainImage, manual: Focus | None) -> None:
        """The crop's focus, as the crop preview chooses it (decoding the image only to look for a face)."""
        if manual is not None:
            item.focus, item.focus_source = manual, "focus"
        elif self.config.face_crop:
            item.focus, item.focus_source = choose_focus(open_rgb(item.path), None, True, self.face_detector)

    # --- 3. devices and latents -----------------------------------------------------------------

    def _place_models(self, run: _RunState) -> None:
        from accelerate.utils import set_seed

        run.accelerator, run.weight_dtype = self._accelerator(run)
        set_seed(self.config.seed)
        run.vae.requires_grad_(False)
        run.unet.requires_grad_(False)
        for encoder in run.text_encoders:
            encoder.requires_grad_(False)
        run.vae.to(run.device, torch.float32)  # fp32 (also when Flux/SD3 load in half): SDXL's VAE overflows in fp16
        for module in (run.unet, *run.text_encoders):
            # Frozen weights in half precision (LoRA weights stay fp32), cast in the same move: an fp32
            # copy never reaches the device (FLUX.1's transformer alone is ~48 GB in fp32). NF4 weights
            # (quantize = "nf4") move and keep their packed bytes: bitsandbytes ignores the dtype for them.
            # They must not have run on the CPU before this move: bitsandbytes 0.50 repacks a Linear4bit
            # into a CPU-only layout after an eval-mode CPU forward (AVX512-BF16), which .to("cuda") keeps.
            module.to(run.device, dtype=run.weight_dtype)

    def _accelerator(self, run: _RunState):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        device, precision = self._precision()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # In the app one process trains many times, on one device: start from a fresh state
            # each run (accelerate keeps it in a process-wide singleton).
            AcceleratorState._reset_state(True)
        # SDXL conditions on the first text encoder's penultimate layer: its last layer's LoRA gets no
        # gradient, which DDP must be told to expect.
        unused = self.config.train_text_encoder and run.family == SDXL
        ddp = DistributedDataParallelKwargs(find_unused_parameters=unused)
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu", kwargs_handlers=[ddp])
        return accelerator, _WEIGHT_DTYPES.get(precision, torch.float32)

    def _precision(self) -> tuple[torch.device, str]:
        """(training device, accelerate's mixed precision): "auto" resolved, half precision refused on the CPU."""
        device = self.requested_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = self.config.mixed_precision
        if precision == "auto":
            cuda_precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
            precision = cuda_precision if device.type == "cuda" else "no"
        if device.type != "cuda" and precision != "no":
            raise UserError(f'Mixed precision {precision} needs a CUDA GPU; use mixed_precision = "no" on the CPU.')
        return device, precision

    def _cache_file(self, run: _RunState) -> Path:
        vae_key = hashlib.sha256(
            (self.config.model + json.dumps(dict(run.vae.config), sort_keys=True, default=str)).encode()
        ).hexdigest()[:12]
        mode = "b" if self.config.bucketing else "s"
        return Path(self.config.images) / ".lorapg-cache" / f"latents-{run.resolution}{mode}-{vae_key}.safetensors"

    @torch.no_grad()
    def _encode_latents(self, run: _RunState, items: list[TrainImage]) -> torch.Tensor:
        pixels = torch.stack([load_pixels(item) for item in items]).to(run.device, torch.float32)
        # The distribution's mean, not a sample: deterministic, so cached and uncached runs agree.
        latents = run.vae.encode(pixels).latent_dist.mean
        shift = getattr(run.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * run.vae.config.scaling_factor).float()

    def _cache_latents(self, run: _RunState) -> list[torch.Tensor]:
        """Every item's latents, from the on-disk cache where it has them; new ones are added to it."""
        from safetensors.torch import save

        path = self._cache_file(run)
        cached = _read_latent_cache(path)
        result: list[torch.Tensor] = []
        missing = 0
        for n, item in enumerate(run.items):
            key = _latent_key(item)
            if key in cached:
                load_pixels_crop_only(item)
                result.append(cached[key])
                continue
            self._status(f"Caching VAE latents {n + 1}/{len(run.items)}…")
            result.append(self._encode_latents(run, [item])[0].cpu())
            cached[key] = result[-1]
            missing += 1
        if missing and self.main:  # every process encodes (same latents); one writes the cache
            atomic_write_bytes(path, save({k: v.contiguous() for k, v in cached.items()}))
        if self.main:
            log.info("latents: %d cached, %d encoded (%s)", len(run.items) - missing, missing, path.name)
        return result

    def _cache_flow_text(self, run: _RunState) -> None:
        """Flux.1 / SD 3.5: every caption's embeddings before the loop, then the text encoders leave the
        device. Shuffled tags make captions no cache can list: the encoders then stay and encode each step."""
        config = self.config
        self._status("Encoding the captions (T5 and CLIP)…")
        captions = [item.caption for item in run.items] + ([""] if config.caption_dropout > 0 else [])
        run.flow.cache_text(captions, run.device)
        if config.sample_steps:
            run.flow.cache_sample_prompt(self._sample_prompt(), run.device)
        if not config.shuffle_tags:
            run.flow.release_text_encoders()

    # --- 4. adapters and optimization -----------------------------------------------------------

    def _add_adapters(self, run: _RunState) -> None:
        """LoRA adapters on the UNet (and the text encoders): only their weights train, in fp32."""
        from peft import LoraConfig

        config = self.config
        torch.manual_seed(config.seed)  # the adapters' initial weights
        if run.flow is not None:
            unet_targets = run.flow.targets
        else:
            unet_targets = UNET_TARGETS + (CONV_TARGETS if config.train_conv else [])
        run.unet.add_adapter(
            LoraConfig(
                r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=unet_targets
            )
        )
        text_encoders = self._text_encoders_to_train(run)
        for encoder in text_encoders.values():
            encoder.add_adapter(
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.alpha,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_TARGETS,
                )
            )
        # diffusers' names: Flux / SD 3 LoRAs are keyed transformer.…, SD ones unet.… (kohya on export).
        run.trained = {("transformer" if run.flow is not None else "unet"): run.unet, **text_encoders}
        for module in run.trained.values():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing(run)

    def _text_encoders_to_train(self, run: _RunState) -> dict[str, Any]:
        """Export prefix -> text encoder that gets a LoRA: none unless train_text_encoder; SD's encoder(s)
        (SDXL's two); Flux.1's CLIP-L, SD 3.5's two CLIP encoders (never T5)."""
        if not self.config.train_text_encoder:
            return {}
        if run.flow is not None:
            return run.flow.trainable_text_encoders()
        names = ("text_encoder", "text_encoder_2")[: len(run.text_encoders)]
        return dict(zip(names, run.text_encoders, strict=True))

    def _enable_gradient_checkpointing(self, run: _RunState) -> None:
        run.unet.enable_gradient_checkpointing()
        for encoder in (module for module in run.trained.values() if module is not run.unet):
            # transformers 5 renamed it; the old name warns.
            enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
            enable()

    def _prepare_optimization(self, run: _RunState) -> None:
        """The optimizer, the step counts, the LR schedule; the accelerator wraps them with the trained modules."""
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        config, accelerator = self.config, run.accelerator
        param_groups = [{"params": [p for p in run.unet.parameters() if p.requires_grad], "lr": config.unet_lr}]
        text_encoders = {name: module for name, module in run.trained.items() if module is not run.unet}
        if text_encoders:  # their own group: text_encoder_lr
            te_params = [p for e in text_encoders.values() for p in e.parameters() if p.requires_grad]
            param_groups.append({"params": te_params, "lr": config.text_encoder_lr})
        optimizer, run.optimizer_name = make_optimizer(config.optimizer, param_groups, run.device)
        self._plan_steps(run)
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=run.total_steps * accelerator.num_processes,
        )
        prepared = accelerator.prepare(run.unet, *text_encoders.values(), optimizer, lr_scheduler)
        run.unet, run.optimizer, run.lr_scheduler = prepared[0], prepared[-2], prepared[-1]
        if text_encoders:
            # Trained encoders run through their DDP wrappers, which average their gradients across processes.
            run.text_encoders = list(prepared[1:-2])
            if run.flow is not None:
                run.flow.use_trained_text_encoders(dict(zip(text_encoders, run.text_encoders, strict=True)))
        if run.flow is not None:
            run.noise_scheduler = run.flow.scheduler()
        else:
            run.noise_scheduler = DDPMScheduler.from_config(run.pipe.scheduler.config)

    def _plan_steps(self, run: _RunState) -> None:
        """Steps per epoch (global batches), total steps (max_steps caps them) and the epochs they span."""
        config = self.config
        run.global_batch_size = config.batch_size * run.accelerator.num_processes
        run.steps_per_epoch, run.total_steps = planned_steps(
            run.groups, config.repeats, run.global_batch_size, config.epochs, config.max_steps
        )
        run.epochs = math.ceil(run.total_steps / run.steps_per_epoch)

    # --- 5. resume ------------------------------------------------------------------------------

    def _resume_or_start(self, run: _RunState) -> None:
        config = self.config
        latest = checkpoints.latest_checkpoint(self.work_dir) if config.resume else None
        if latest is not None:
            self._resume(latest, run)
            self._status(f"Resuming from {latest.name} (step {run.step} of {run.total_steps}).")
        run.result = TrainResult(
            config.name, None, run.family, run.step, run.total_steps, False, latest, run.losses, resumed_from=run.step
        )
        if self.main:
            log.info(
                "training %s: %d images, %d buckets, %d steps/epoch, %d steps, %d process(es) × batch %d, "
                "optimizer %s, precision %s, %s",
                config.name,
                len(run.items),
                len(run.groups),
                run.steps_per_epoch,
                run.total_steps,
                run.accelerator.num_processes,
                config.batch_size,
                run.optimizer_name,
                run.accelerator.mixed_precision,
                run.device,
            )
        config_path = self.work_dir / "config.toml"
        if self.main:
            atomic_write_text(config_path, to_toml(config))
        run.result.config_path = config_path

    def _resume(self, path: Path, run: _RunState) -> None:
        """Load the checkpoint's LoRA weights, optimizer, schedule and position into ``run``."""
        saved = checkpoints.load_checkpoint(path)
        previous = json.loads(saved.state["config"])
        # A checkpoint from before a setting existed was made with that setting's default.
        defaults = asdict(TrainConfig())
        changed = [key for key in RESUME_KEYS if previous.get(key, defaults[key]) != getattr(self.config, key)]
        if changed:
            raise UserError(
                f"The checkpoint in {self.work_dir} was made with different settings ({', '.join(changed)}). "
                "Set resume = false (or --no-resume) to start over, or pick another name."
            )
        # batch_size is per process: another process count is another global batch, other batches and
        # another LR schedule position, so the checkpoint's place in the run would mean something else.
        processes = int(saved.state.get("processes", 1))
        if processes != run.accelerator.num_processes:
            raise UserError(
                f"The checkpoint in {self.work_dir} was made by {processes} training process(es), this run has "
                f"{run.accelerator.num_processes}: launch it with --num_processes {processes} to resume, or set "
                "resume = false (--no-resume) to start over."
            )
        params = {
            f"{prefix}.{name}": p
            for prefix, module in run.trained.items()
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        missing = set(params) ^ set(saved.lora)
        if missing:
            raise UserError(f"Checkpoint {path} does not match this model ({len(missing)} LoRA weights differ).")
        with torch.no_grad():
            for key, parameter in params.items():
                parameter.copy_(saved.lora[key].to(parameter.device, parameter.dtype))
        run.optimizer.load_state_dict(saved.state["optimizer"])
        run.lr_scheduler.load_state_dict(saved.state["lr_scheduler"])
        run.losses = [(int(s), float(v)) for s, v in saved.state["losses"].tolist()]
        run.step, run.start_epoch, run.start_batch = saved.step, saved.epoch, saved.batch

    def _save_checkpoint(self, run: _RunState, epoch: int, batch: int) -> Path:
        """A checkpoint at (epoch, batch): the next batch to train, so a resume continues from there."""
        state = {
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "processes": run.accelerator.num_processes,
            "losses": torch.tensor(run.losses, dtype=torch.float64) if run.losses else torch.zeros(0, 2),
            "config": json.dumps(asdict(self.config)),
        }
        lora = {
            f"{prefix}.{name}": p
            for prefix, module in run.trained.items()
            for name, p in run.accelerator.unwrap_model(module).named_parameters()
            if p.requires_grad
        }
        return checkpoints.save_checkpoint(
            self.work_dir,
            step=run.step,
            epoch=epoch,
            batch=batch,
            lora=lora,
            state=state,
            keep=self.config.keep_checkpoints,
        )

    # --- 6. the loop ----------------------------------------------------------------------------

    def _train(self, run: _RunState) -> bool:
        """Epochs until the last step; False when cancelled (a checkpoint keeps the place)."""
        for module in run.trained.values():
            module.train()
        run.session_start, run.session_steps = time.perf_counter(), 0
        epoch = run.start_epoch
        while run.step < run.total_steps:
            if not self._train_epoch(run, epoch):
                return False
            epoch += 1
            # Checkpoints and samples at epoch boundaries (counted in steps) and after the last step.
            if run.step % run.steps_per_epoch == 0 or run.step >= run.total_steps:
                self._end_epoch(run, epoch)
        return True

    def _train_epoch(self, run: _RunState, epoch: int) -> bool:
        """The global batches of one epoch (a resumed one from its checkpointed batch); False when cancelled."""
        config, accelerator = self.config, run.accelerator
        batches = epoch_batches(run.groups, config.repeats, run.global_batch_size, config.seed, epoch)
        first = run.start_batch if epoch == run.start_epoch else 0
        for batch_index in range(first, len(batches)):
            if run.step >= run.total_steps:
                break
            share = distributed.process_share(
                batches[batch_index],
                seed=config.seed,
                epoch=epoch,
                batch=batch_index,
                batch_size=config.batch_size,
                process=accelerator.process_index,
            )
            loss = self._train_step(run, share, len(batches[batch_index]))
            self._report_step(run, epoch, loss)
            # Cancel between optimizer steps: save where we are, so Resume continues from here.
            if self._cancel_requested(run):
                self._cancel(run, epoch, batch_index + 1, loss)
                return False
        return True

    def _cancel_requested(self, run: _RunState) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step, or DDP would hang."""
        wanted = self.should_cancel()
        if run.accelerator.num_processes == 1:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=run.device)
        return run.accelerator.reduce(flag, reduction="sum").item() > 0

    def _train_step(self, run: _RunState, share: list[distributed.Sample], global_count: int) -> float:
        """One optimizer step on this process's share of a global batch; returns the global batch's mean loss."""
        accelerator, optimizer = run.accelerator, run.optimizer
        indices = [sample.item for sample in share]
        batch = [run.items[i] for i in indices]
        if run.latents_cache is not None:
            latents = torch.stack([run.latents_cache[i] for i in indices]).to(run.device)
        else:
            latents = self._encode_latents(run, batch)
        # DDP averages the processes' gradients: N × (this share's sum ÷ the global count) averages to
        # the gradient of the global batch's mean, whatever the shares' sizes.
        per_sample = self._loss(run, latents, batch, share)
        weights = torch.tensor([sample.weight for sample in share], device=per_sample.device)
        loss = (per_sample * weights).sum() * (accelerator.num_processes / global_count)
        accelerator.backward(loss)
        if accelerator.sync_gradients and self.config.max_grad_norm > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        optimizer.step()
        run.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.session_steps += 1
        value = accelerator.gather(loss.detach()).mean().item()
        run.losses.append((run.step, value))
        return value

    def _report_step(self, run: _RunState, epoch: int, loss: float) -> None:
        rate = run.steps_per_s()
        eta = (run.total_steps - run.step) / rate if rate else None
        self.on_progress(TrainProgress("train", epoch + 1, run.epochs, run.step, run.total_steps, loss, rate, eta))

    def _cancel(self, run: _RunState, epoch: int, next_batch: int, loss: float) -> None:
        run.result.checkpoint = (
            self._save_checkpoint(run, epoch, next_batch) if run.accelerator.is_main_process else None
        )
        run.accelerator.wait_for_everyone()  # the checkpoint exists before any process reports the cancel
        run.result.cancelled = True
        self._finish(run)
        message = f"Cancelled at step {run.step}; checkpoint kept."
        self.on_progress(TrainProgress("done", epoch + 1, run.epochs, run.step, run.total_steps, loss, message=message))

    def _end_epoch(self, run: _RunState, epochs_done: int) -> None:
        """Every save_every_epochs and at the end: a checkpoint (and a per-epoch LoRA); a sample image."""
        config, accelerator, result = self.config, run.accelerator, run.result
        last = run.step >= run.total_steps
        if accelerator.is_main_process and (epochs_done % config.save_every_epochs == 0 or last):
            result.checkpoint = self._save_checkpoint(run, epochs_done, 0)
            if not last:
                result.epoch_loras.append(self._export(run, epochs_done, per_epoch=True))
        if accelerator.is_main_process and config.sample_steps:
            result.samples.append(self._sample(run, epochs_done))
            for module in run.trained.values():
                module.train()
        accelerator.wait_for_everyone()

    @staticmethod
    def _release_wrappers(run: _RunState) -> None:
        """Drop the run's references to the accelerator-prepared (DDP-wrapped) modules and optimizer."""
        run.unet = run.optimizer = run.lr_scheduler = None
        run.text_encoders = []
        if run.flow is not None:  # it holds the trained CLIP encoders' wrappers (and their reducers) too
            run.flow.use_trained_text_encoders({})

    def _finish(self, run: _RunState) -> None:
        run.result.steps = run.step
        run.result.losses = list(run.losses)
        run.result.steps_per_s = run.steps_per_s()

    # --- the loss -------------------------------------------------------------------------------

    def _loss(
        self, run: _RunState, latents: torch.Tensor, batch: list[TrainImage], share: list[distributed.Sample]
    ) -> torch.Tensor:
        """Each sample's MSE between the UNet's prediction and its target, weighted (min-SNR, prior loss)."""
        if run.flow is not None:
            per_sample = run.flow.loss(
                run, latents, self._step_captions(run, batch, share), [s.noise_seed for s in share]
            )
            return self._prior_weight(per_sample, batch)
        noise, timesteps = self._noise(run, latents, share)
        noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, extra = self._conditioning(run, batch, share, latents.device)
        prediction = run.unet(noisy.to(run.weight_dtype), timesteps, hidden, **extra).sample
        if run.noise_scheduler.config.prediction_type == "v_prediction":
            target = run.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return self._weigh(run, per_sample, timesteps, batch)

    def _noise(
        self, run: _RunState, latents: torch.Tensor, share: list[distributed.Sample]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and timestep from its own seed (drawn on the CPU: the same on every device).

        Per sample, not per batch: a sample gets the same noise whichever process trains it and
        however many samples share its batch.
        """
        num_timesteps = run.noise_scheduler.config.num_train_timesteps
        noises, timesteps = [], []
        for sample in share:
            generator = torch.Generator("cpu").manual_seed(sample.noise_seed)
            noise = torch.randn(latents.shape[1:], generator=generator)
            if self.config.noise_offset:
                # Offset noise (crosslabs): lets the model learn images darker/brighter on average.
                offset = torch.randn((latents.shape[1], 1, 1), generator=generator)
                noise += self.config.noise_offset * offset
            noises.append(noise)
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        return torch.stack(noises).to(latents.device), torch.cat(timesteps).to(latents.device)

    def _conditioning(
        self, run: _RunState, batch: list[TrainImage], share: list[distributed.Sample], device
    ) -> tuple[torch.Tensor, dict]:
        """The captions' hidden states and, for SDXL, the added conditions (pooled text, size/crop time ids)."""
        config = self.config
        captions = self._step_captions(run, batch, share)
        # Varied captions are encoded each step: caching every variant seen would grow without bound.
        varied = config.shuffle_tags or config.caption_dropout > 0
        cache = not config.train_text_encoder and not varied
        hidden, pooled = self._encode_text(run, captions, device, cache=cache)
        if run.family != SDXL:
            return hidden, {}
        time_ids = torch.tensor(
            [
                [item.size[1], item.size[0], item.crop[0], item.crop[1], item.bucket[1], item.bucket[0]]
                for item in batch
            ],
            device=device,
            dtype=run.weight_dtype,
        )
        return hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def _step_captions(self, run: _RunState, batch: list[TrainImage], share: list[distributed.Sample]) -> list[str]:
        """The batch's captions at this step, after tag shuffling and caption dropout."""
        config = self.config
        # Each sample's caption variation is keyed by its noise seed (its global slot), not its place in
        # this process's share, so shuffles and dropouts are the same whatever the process count.
        return [
            step_caption(
                item.caption,
                shuffle=config.shuffle_tags,
                keep_tokens=config.keep_tokens,
                dropout=config.caption_dropout,
                seed=config.seed,
                step=run.step,
                index=sample.noise_seed,
            )
            for item, sample in zip(batch, share, strict=True)
        ]

    def _weigh(
        self, run: _RunState, per_sample: torch.Tensor, timesteps: torch.Tensor, batch: list[TrainImage]
    ) -> torch.Tensor:
        """Min-SNR-γ and regularization images' prior_loss_weight, applied to per-sample losses."""
        gamma = self.config.min_snr_gamma
        if gamma:
            from diffusers.training_utils import compute_snr

            # Min-SNR-γ (Hang et al. 2023): cap the weight of low-noise timesteps, which otherwise dominate.
            snr = compute_snr(run.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=gamma)
            v_prediction = run.noise_scheduler.config.prediction_type == "v_prediction"
            weight = weight / (snr + 1) if v_prediction else weight / snr
            per_sample = per_sample * weight
        return self._prior_weight(per_sample, batch)

    @staticmethod
    def _prior_weight(per_sample: torch.Tensor, batch: list[TrainImage]) -> torch.Tensor:
        """Regularization images' losses weigh prior_loss_weight."""
        if any(item.loss_weight != 1.0 for item in batch):
            per_sample = per_sample * torch.tensor([item.loss_weight for item in batch], device=per_sample.device)
        return per_sample

    def _encode_text(self, run: _RunState, captions: list[str], device, *, cache: bool):
        """(hidden states, pooled embedding or None); frozen encoders' outputs are cached per caption."""
        if not cache:
            return self._encode_captions(run, captions, device)
        text_cache = run.text_cache
        with torch.no_grad():
            for caption in captions:
                if caption not in text_cache:
                    hidden, pooled = self._encode_captions(run, [caption], device)
                    text_cache[caption] = (hidden[0], None if pooled is None else pooled[0])
        hidden = torch.stack([text_cache[c][0] for c in captions])
        if run.family != SDXL:
            return hidden, None
        return hidden, torch.stack([text_cache[c][1] for c in captions]).to(run.weight_dtype)

    @staticmethod
    def _encode_captions(run: _RunState, captions: list[str], device):
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(run.tokenizers, run.text_encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            if run.family == SDXL:
                output = encoder(ids, output_hidden_states=True)
                pooled = output[0]  # the second encoder's projected text embedding
                hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            else:
                hidden_states.append(encoder(ids)[0])
        return torch.cat(hidden_states, dim=-1).to(run.weight_dtype), pooled

    # --- 7. export and samples ------------------------------------------------------------------

    def _export_final(self, run: _RunState) -> None:
        result = run.result
        if run.accelerator.is_main_process:
            result.lora_path = self._export(run, run.epochs, per_epoch=False)
        self._finish(run)
        last_loss = run.losses[-1][1] if run.losses else None
        self.on_progress(
            TrainProgress(
                "done",
                run.epochs,
                run.epochs,
                run.step,
                run.total_steps,
                last_loss,
                result.steps_per_s,
                0,
                message=f"Saved {result.lora_path}",
            )
        )

    def _export(self, run: _RunState, epochs_done: int, *, per_epoch: bool) -> Path:
        config = self.config
        state = export.peft_state({k: run.accelerator.unwrap_model(m) for k, m in run.trained.items()})
        metadata = export.build_metadata(
            name=config.name if not per_epoch else f"{config.name}-e{epochs_done:04d}",
            family=run.family,
            rank=config.rank,
            alpha=config.alpha,
            trigger=config.trigger,
            captions=[item.caption for item in run.items],
            repeats=config.repeats,
            epochs=epochs_done,
            steps=run.step,
            resolution=(run.resolution, run.resolution),
            started_at=run.started_at,
            base_model=config.model,
            extra={
                "ss_unet_lr": str(config.unet_lr),
                "ss_text_encoder_lr": str(config.text_encoder_lr),
                "ss_learning_rate": str(config.unet_lr),
                "ss_lr_scheduler": config.lr_scheduler,
                "ss_max_train_steps": str(run.step),
                "ss_seed": str(config.seed),
                "ss_min_snr_gamma": str(config.min_snr_gamma),
                "ss_noise_offset": str(config.noise_offset),
                "ss_batch_size_per_device": str(config.batch_size),
                "ss_total_batch_size": str(config.batch_size * run.accelerator.num_processes),
                "ss_network_train_unet_only": str(not config.train_text_encoder),
                "lorapg.preset": config.preset,
            },
        )
        path = self.epochs_dir / f"{config.name}-e{epochs_done:04d}.safetensors" if per_epoch else self.lora_path
        if run.flow is not None:
            metadata.update(run.flow.metadata())
            return export.export_transformer_lora(
                state,
                path,
                rank=config.rank,
                alpha=config.alpha,
                metadata=metadata,
                save_precision=config.save_precision,
            )
        return export.export_kohya(
            state,
            path,
            family=run.family,
            alpha=config.alpha,
            metadata=metadata,
            save_precision=config.save_precision,
            unet_config=run.accelerator.unwrap_model(run.trained["unet"]).config,
        )

    def _sample_prompt(self) -> str:
        config = self.config
        return config.sample_prompt.replace("{trigger}", config.trigger) or config.trigger

    @torch.no_grad()
    def _sample(self, run: _RunState, epoch: int) -> Path:
        config, pipe = self.config, run.pipe
        prompt = self._sample_prompt()
        self.on_progress(
            TrainProgress(
                "sample",
                epoch,
                run.epochs,
                run.step,
                run.total_steps,
                message=f"Epoch {epoch}: drawing a sample image…",
            )
        )
        denoiser = run.accelerator.unwrap_model(run.unet)
        for module in run.trained.values():  # trained text encoders too: Flux/SD 3 samples run them
            module.eval()
        if run.flow is None:
            pipe.unet = denoiser
        pipe.set_progress_bar_config(disable=True)
        if run.weight_dtype != torch.float32:
            autocast = torch.autocast(run.device.type, dtype=run.weight_dtype)
        else:
            autocast = contextlib.nullcontext()
        with autocast:
            generator = torch.Generator("cpu").manual_seed(config.sample_seed)
            if run.flow is not None:
                size = run.resolution
                # The encoders unwrapped, as the transformer is: this process draws alone while the others
                # wait in a barrier, and a DDP wrapper's forward broadcasts its buffers to all of them.
                encoders = {name: run.accelerator.unwrap_model(e) for name, e in run.flow.trained_encoders.items()}
                image = run.flow.draw_sample(
                    denoiser, prompt, config.sample_steps, size, generator, run.device, encoders=encoders
                )
            else:
                image = pipe(
                    prompt=prompt,
                    num_inference_steps=config.sample_steps,
                    width=run.resolution,
                    height=run.resolution,
                    generator=generator,
                ).images[0]
        path = self.work_dir / "samples" / f"epoch-{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.on_progress(
            TrainProgress(
                "sample",
                epoch,
                run.epochs,
                run.step,
                run.total_steps,
                sample=image,
                message=f"Epoch {epoch}: sample saved.",
            )
        )
        return path


def _read_latent_cache(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except Exception as exc:  # a corrupt cache is rebuilt, never trusted
        log.warning("ignoring unreadable latent cache %s (%s)", path, exc)
        return {}


def load_pixels_crop_only(item: TrainImage) -> None:
    """Set ``item.crop`` (needed for SDXL time ids) without decoding: the cache holds the latents."""
    item.crop = plan_crop(item.size, item.bucket, item.focus).crop


def _latent_key(item: TrainImage) -> str:
    """The cache key of an item's latents: a moved crop box is other pixels. Centred crops keep the
    key they always had, so existing caches stay valid."""
    key = f"{item.sha256[:32]}_{item.bucket[0]}x{item.bucket[1]}"
    if item.focus is None:
        return key
    top, left = plan_crop(item.size, item.bucket, item.focus).crop
    return f"{key}_{left}_{top}"


def make_optimizer(choice: str, param_groups: list[dict], device: torch.device):
    """8-bit AdamW (bitsandbytes) when asked for or, with ``auto``, on CUDA where it works; else AdamW."""
    if choice in ("adamw8bit", "auto") and (choice == "adamw8bit" or device.type == "cuda"):
        optimizer = _adamw8bit(param_groups, device)
        if optimizer is not None:
            return optimizer, "AdamW8bit"
        if choice == "adamw8bit":
            log.warning("bitsandbytes 8-bit AdamW does not work on %s here; using AdamW", device)
    return torch.optim.AdamW(param_groups, weight_decay=1e-2), "AdamW"


def _adamw8bit(param_groups: list[dict], device: torch.device):
    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        test = bnb.optim.AdamW8bit([probe], lr=1e-3)
        test.step()  # bitsandbytes installs on machines whose device it cannot run on: try one step
        return bnb.optim.AdamW8bit(param_groups, weight_decay=1e-2)
    except Exception as exc:  # ImportError, missing CUDA kernels, unsupported device
        log.info("8-bit AdamW unavailable (%s: %s)", type(exc).__name__, exc)
        return None


def remove_run_outputs(lora_dir: Path, name: str, work_dir: Path) -> None:
    """Before overwriting: the old LoRA, its per-epoch files and checkpoints."""
    (Path(lora_dir) / f"{name}.safetensors").unlink(missing_ok=True)
    shutil.rmtree(Path(lora_dir) / f"{name}_epochs", ignore_errors=True)
    checkpoints.clear_checkpoints(work_dir)
