"""The LoRA trainer: diffusers + peft on SD 1.x / 2.x and SDXL, run by ``accelerate``.

One ``Trainer.run()`` is one training run:

1. load a training copy of the base model (fp32 weights, separate from the inference pipeline);
2. read the dataset, assign aspect-ratio buckets, cache VAE latents (on disk, per resolution);
3. add LoRA adapters (UNet, optionally the text encoder(s)); optimizer, LR schedule, accelerator;
4. resume from the last checkpoint when there is one;
5. the loop: noise, timesteps, the UNet's prediction, (min-SNR weighted) MSE, one optimizer step;
   progress after every step, cancel checked between steps, a checkpoint and a sample image per epoch;
6. export the kohya-format LoRA into the LoRA folder.

Randomness the result depends on (batch order, noise, timesteps) comes from seeded sources whose
state is checkpointed, so a resumed run reaches the uninterrupted run's weights.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from lorapg.atomic_files import atomic_write_bytes, atomic_write_text
from lorapg.diffusion.families import SDXL
from lorapg.errors import UserError
from lorapg.training import checkpoints, export
from lorapg.training.config import TrainConfig, to_toml
from lorapg.training.dataset import Dataset
from lorapg.training.validation import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py targets
CONV_TARGETS = ["conv1", "conv2"]  # every ResNet block's two 3×3 convolutions (kohya's LoCon)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Settings a checkpoint must share with the run that resumes it (epochs and max_steps may grow).
RESUME_KEYS = ("model", "images", "regularization_images", "prior_loss_weight", "trigger", "rank", "alpha",
               "train_text_encoder", "train_conv", "repeats", "batch_size",
               "resolution", "bucketing", "seed")


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
        return (f"epoch {self.epoch}/{self.epochs}, step {self.step}/{self.total_steps}{loss}, "
                f"{self.steps_per_s:.2f} steps/s{eta}")


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
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


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


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """kohya-style buckets: sides in multiples of ``step``, area at most resolution², ratio ≤ max_aspect."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * 2:
        height = (area // width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(item: TrainImage) -> torch.Tensor:
    """Resize to cover the bucket, center-crop; ``[-1, 1]`` CHW float32. Records the crop offset."""
    with Image.open(item.path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = item.bucket
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.Resampling.LANCZOS)
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        item.crop = (top, left)
        image = image.crop((left, top, left + width, top + height))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def epoch_batches(groups: dict[tuple[int, int], list[int]], repeats: int, batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The batches of one epoch: each bucket's images (× repeats) shuffled, chunked, then batches shuffled.

    Seeded by (seed, epoch) alone, so a resumed run rebuilds exactly the batches it was in.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = [index for index in groups[bucket] for _ in range(repeats)]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


# --- the trainer ----------------------------------------------------------------------------------


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
    ):
        self.config = config
        self.lora_dir = Path(lora_dir)
        self.work_dir = Path(work_dir)
        self.requested_device = device
        self.allow_pickle = allow_pickle
        self.single_file_config = single_file_config
        self.max_image_pixels = max_image_pixels
        self.on_progress = on_progress or (lambda progress: None)
        self.should_cancel = should_cancel or (lambda: False)

    @property
    def lora_path(self) -> Path:
        return self.lora_dir / f"{self.config.name}.safetensors"

    @property
    def epochs_dir(self) -> Path:
        return self.lora_dir / f"{self.config.name}_epochs"

    def _status(self, message: str) -> None:
        log.info(message)
        self.on_progress(TrainProgress("prepare", message=message))

    # --- 1. the model ---------------------------------------------------------------------------

    def _load_model(self):
        from lorapg.diffusion.model_source import resolve_model_source
        from lorapg.diffusion.pipeline_loader import load_pipeline

        source = resolve_model_source(self.config.model, allow_pickle=self.allow_pickle)
        self._status(f"Loading a training copy of {source.display_name} (fp32)…")
        # Its own copy on the CPU: the inference pipeline's (half-precision) modules are never trained.
        pipe, family = load_pipeline(source, torch.device("cpu"), torch.float32,
                                     single_file_config=self.single_file_config)
        return source, pipe, family

    # --- 2. data --------------------------------------------------------------------------------

    def _read_dataset(self) -> list[TrainImage]:
        items = self._read_folder(self.config.images, "Image folder", self.config.trigger)
        if self.config.regularization_images:
            # Captions as written: the trigger must not leak into the images that teach "everything else".
            items += self._read_folder(self.config.regularization_images, "Regularization folder", None,
                                       loss_weight=self.config.prior_loss_weight)
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
        for c in report.trainable(drop_near_duplicates=drop):
            caption = dataset.caption(c.file)
            if trigger is not None:
                caption = build_caption(trigger, caption)
            items.append(TrainImage(dataset.folder / c.file, c.sha256, caption, (c.width, c.height),
                                    loss_weight=loss_weight))
        return items

    def _cache_file(self, resolution: int, pipe) -> Path:
        vae_key = hashlib.sha256(
            (self.config.model + json.dumps(dict(pipe.vae.config), sort_keys=True, default=str)).encode()
        ).hexdigest()[:12]
        mode = "b" if self.config.bucketing else "s"
        return Path(self.config.images) / ".lorapg-cache" / f"latents-{resolution}{mode}-{vae_key}.safetensors"

    @torch.no_grad()
    def _encode_latents(self, vae, items: list[TrainImage], device) -> torch.Tensor:
        pixels = torch.stack([load_pixels(item) for item in items]).to(device, torch.float32)
        # The distribution's mean, not a sample: deterministic, so cached and uncached runs agree.
        latents = vae.encode(pixels).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def _cache_latents(self, vae, items: list[TrainImage], resolution: int, pipe, device) -> list[torch.Tensor]:
        from safetensors.torch import load_file, save

        path = self._cache_file(resolution, pipe)
        cached: dict[str, torch.Tensor] = {}
        if path.is_file():
            try:
                cached = load_file(str(path))
            except Exception as exc:  # a corrupt cache is rebuilt, never trusted
                log.warning("ignoring unreadable latent cache %s (%s)", path, exc)
        keys = [f"{item.sha256[:32]}_{item.bucket[0]}x{item.bucket[1]}" for item in items]
        result: list[torch.Tensor] = []
        missing = 0
        for n, (item, key) in enumerate(zip(items, keys, strict=True)):
            if key in cached:
                load_pixels_crop_only(item)
                result.append(cached[key])
                continue
            self._status(f"Caching VAE latents {n + 1}/{len(items)}…")
            result.append(self._encode_latents(vae, [item], device)[0].cpu())
            cached[key] = result[-1]
            missing += 1
        if missing:
            atomic_write_bytes(path, save({k: v.contiguous() for k, v in cached.items()}))
        log.info("latents: %d cached, %d encoded (%s)", len(items) - missing, missing, path.name)
        return result

    # --- 3. the run -----------------------------------------------------------------------------

    def run(self) -> TrainResult:  # noqa: C901 - the numbered steps read top to bottom, like a diffusers __call__
        config = self.config
        started_at = time.time()
        self.work_dir.mkdir(parents=True, exist_ok=True)

        # 1. The base model, as a training copy.
        source, pipe, family = self._load_model()
        unet, vae, scheduler_config = pipe.unet, pipe.vae, pipe.scheduler.config
        text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == SDXL else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == SDXL else [])
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        native = int(unet.config.sample_size * vae_scale)
        resolution = config.resolution or native
        # Sides must divide by the VAE factor × the UNet's downsamplings; real models: kohya's 64 px.
        multiple = vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)
        step_px = max(multiple, 64) if resolution >= 256 else multiple

        # 2. The data: buckets, captions.
        items = self._read_dataset()
        buckets = make_buckets(resolution, step_px) if config.bucketing else [(resolution, resolution)]
        for item in items:
            item.bucket = assign_bucket(item.size, buckets)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.bucket, []).append(index)

        # 3. The accelerator, dtypes and devices.
        accelerator, weight_dtype = self._accelerator()
        device = accelerator.device
        from accelerate.utils import set_seed

        set_seed(config.seed)
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        for encoder in text_encoders:
            encoder.requires_grad_(False)
        vae.to(device)  # stays fp32: SDXL's VAE overflows in fp16
        for module in (unet, *text_encoders):
            module.to(device)
            if weight_dtype != torch.float32:  # frozen weights in half precision; LoRA weights stay fp32
                module.to(dtype=weight_dtype)

        latents_cache: list[torch.Tensor] | None = None
        if config.cache_latents:
            latents_cache = self._cache_latents(vae, items, resolution, pipe, device)

        # 4. LoRA adapters: only their weights train (and stay fp32 under mixed precision).
        from peft import LoraConfig

        torch.manual_seed(config.seed)
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                    target_modules=UNET_TARGETS + (CONV_TARGETS if config.train_conv else [])))
        if config.train_text_encoder:
            for encoder in text_encoders:
                encoder.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                               target_modules=TEXT_TARGETS))
        trained = {"unet": unet}
        if config.train_text_encoder:
            trained["text_encoder"] = text_encoders[0]
            if family == SDXL:
                trained["text_encoder_2"] = text_encoders[1]
        for module in trained.values():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                for encoder in text_encoders:
                    # transformers 5 renamed it; the old name warns.
                    enable = getattr(encoder, "activation_checkpointing_enable", None) or \
                        encoder.gradient_checkpointing_enable
                    enable()

        # 5. Optimizer and LR schedule.
        groups_params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.unet_lr}]
        if config.train_text_encoder:
            te_params = [p for e in text_encoders for p in e.parameters() if p.requires_grad]
            groups_params.append({"params": te_params, "lr": config.text_encoder_lr})
        optimizer, optimizer_name = make_optimizer(config.optimizer, groups_params, device)
        steps_per_epoch = len(epoch_batches(groups, config.repeats, config.batch_size, config.seed, 0))
        steps_per_epoch = max(1, steps_per_epoch // accelerator.num_processes)
        total_steps = config.epochs * steps_per_epoch
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                     num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=total_steps * accelerator.num_processes)
        prepared = accelerator.prepare(unet, *([trained[k] for k in trained if k != "unet"]), optimizer, lr_scheduler)
        unet = prepared[0]
        optimizer, lr_scheduler = prepared[-2], prepared[-1]
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        generator = torch.Generator("cpu").manual_seed(config.seed)

        # 6. Resume.
        step, start_epoch, start_batch, losses = 0, 0, 0, []
        latest = checkpoints.latest_checkpoint(self.work_dir) if config.resume else None
        if latest is not None:
            step, start_epoch, start_batch, losses = self._resume(latest, trained, optimizer, lr_scheduler,
                                                                  generator)
            self._status(f"Resuming from {latest.name} (step {step} of {total_steps}).")
        resumed_from = step

        text_cache: dict[str, tuple] = {}
        result = TrainResult(config.name, None, family, step, total_steps, False, latest, losses,
                             resumed_from=resumed_from)
        log.info("training %s: %d images, %d buckets, %d steps/epoch, %d steps, optimizer %s, precision %s, %s",
                 config.name, len(items), len(groups), steps_per_epoch, total_steps, optimizer_name,
                 accelerator.mixed_precision, device)
        config_path = self.work_dir / "config.toml"
        atomic_write_text(config_path, to_toml(config))
        result.config_path = config_path

        def save(epoch: int, batch: int) -> Path:
            state = {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "generator": generator.get_state(),
                "losses": torch.tensor(losses, dtype=torch.float64) if losses else torch.zeros(0, 2),
                "config": json.dumps(asdict(config)),
            }
            lora = {f"{prefix}.{name}": p for prefix, module in trained.items()
                    for name, p in accelerator.unwrap_model(module).named_parameters() if p.requires_grad}
            return checkpoints.save_checkpoint(self.work_dir, step=step, epoch=epoch, batch=batch, lora=lora,
                                               state=state, keep=config.keep_checkpoints)

        # 7. The loop.
        for module in trained.values():
            module.train()
        session_start, session_steps = time.perf_counter(), 0
        epoch = start_epoch
        while step < total_steps:
            batches = epoch_batches(groups, config.repeats, config.batch_size, config.seed, epoch)
            batches = batches[accelerator.process_index::accelerator.num_processes][:steps_per_epoch]
            first = start_batch if epoch == start_epoch else 0
            for batch_index in range(first, len(batches)):
                if step >= total_steps:
                    break
                batch = [items[i] for i in batches[batch_index]]
                if latents_cache is not None:
                    latents = torch.stack([latents_cache[i] for i in batches[batch_index]]).to(device)
                else:
                    latents = self._encode_latents(vae, batch, device)
                loss = self._step(accelerator, unet, text_encoders, tokenizers, noise_scheduler, latents, batch,
                                  generator, family, weight_dtype, text_cache, trained)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    params = [p for group in optimizer.param_groups for p in group["params"]]
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                session_steps += 1
                value = accelerator.gather(loss.detach()).mean().item()
                losses.append((step, value))
                rate = session_steps / max(time.perf_counter() - session_start, 1e-9)
                self.on_progress(TrainProgress("train", epoch + 1, epochs, step, total_steps, value, rate,
                                               (total_steps - step) / rate if rate else None))
                # Cancel between optimizer steps: save where we are, so Resume continues from here.
                if self.should_cancel():
                    result.checkpoint = save(epoch, batch_index + 1) if accelerator.is_main_process else None
                    result.cancelled = True
                    self._finish(result, step, losses, session_steps, session_start)
                    self.on_progress(TrainProgress("done", epoch + 1, epochs, step, total_steps, value,
                                                   message=f"Cancelled at step {step}; checkpoint kept."))
                    return result
            epoch += 1
            end_of_epoch = step % steps_per_epoch == 0 or step >= total_steps
            if not end_of_epoch:
                continue
            if accelerator.is_main_process and (epoch % config.save_every_epochs == 0 or step >= total_steps):
                result.checkpoint = save(epoch, 0)
                if step < total_steps:
                    result.epoch_loras.append(self._export(trained, family, epoch, step, items, resolution,
                                                           started_at, per_epoch=True, accelerator=accelerator))
            if accelerator.is_main_process and config.sample_steps:
                result.samples.append(self._sample(pipe, unet, accelerator, epoch, epochs, step, total_steps,
                                                   resolution, weight_dtype))
                for module in trained.values():
                    module.train()
            accelerator.wait_for_everyone()

        # 8. Export.
        if accelerator.is_main_process:
            result.lora_path = self._export(trained, family, epochs, step, items, resolution, started_at,
                                            per_epoch=False, accelerator=accelerator)
        self._finish(result, step, losses, session_steps, session_start)
        self.on_progress(TrainProgress("done", epochs, epochs, step, total_steps, losses[-1][1] if losses else None,
                                       result.steps_per_s, 0, message=f"Saved {result.lora_path}"))
        accelerator.end_training()
        return result

    @staticmethod
    def _finish(result: TrainResult, step: int, losses, session_steps: int, session_start: float) -> None:
        result.steps = step
        result.losses = list(losses)
        result.steps_per_s = session_steps / max(time.perf_counter() - session_start, 1e-9)

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        device = self.requested_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = self.config.mixed_precision
        if precision == "auto":
            cuda_precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16"
            precision = cuda_precision if device.type == "cuda" else "no"
        if device.type != "cuda" and precision != "no":
            raise UserError(f"Mixed precision {precision} needs a CUDA GPU; use mixed_precision = \"no\" on the CPU.")
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # In the app one process trains many times, on one device: start from a fresh state
            # each run (accelerate keeps it in a process-wide singleton).
            AcceleratorState._reset_state(True)
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        return accelerator, weight_dtype

    def _step(self, accelerator, unet, text_encoders, tokenizers, noise_scheduler, latents, batch, generator,
              family, weight_dtype, text_cache, trained) -> torch.Tensor:
        config = self.config
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator)
        if config.noise_offset:
            # Offset noise (crosslabs): lets the model learn images darker/brighter on average.
            noise += config.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        captions = [item.caption for item in batch]
        hidden, extra = self._encode_text(captions, text_encoders, tokenizers, family, device, weight_dtype,
                                          text_cache, cache=not config.train_text_encoder)
        if family == SDXL:
            time_ids = torch.tensor([[item.size[1], item.size[0], item.crop[0], item.crop[1], item.bucket[1],
                                      item.bucket[0]] for item in batch], device=device, dtype=weight_dtype)
            extra = {"added_cond_kwargs": {"text_embeds": extra, "time_ids": time_ids}}
        else:
            extra = {}
        prediction = unet(noisy.to(weight_dtype), timesteps, hidden, **extra).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            # Min-SNR-γ (Hang et al. 2023): cap the weight of low-noise timesteps, which otherwise dominate.
            snr = compute_snr(noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=config.min_snr_gamma)
            weight = weight / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weight / snr
            per_sample = per_sample * weight
        if any(item.loss_weight != 1.0 for item in batch):
            per_sample = per_sample * torch.tensor([item.loss_weight for item in batch], device=per_sample.device)
        return per_sample.mean()

    @staticmethod
    def _encode_text(captions, text_encoders, tokenizers, family, device, weight_dtype, text_cache, *, cache: bool):
        def encode(caption_list):
            hidden_states, pooled = [], None
            for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
                ids = tokenizer(caption_list, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(device)
                if family == SDXL:
                    output = encoder(ids, output_hidden_states=True)
                    pooled = output[0]  # the second encoder's projected text embedding
                    hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
                else:
                    hidden_states.append(encoder(ids)[0])
            return torch.cat(hidden_states, dim=-1).to(weight_dtype), pooled

        if not cache:
            return encode(captions)
        with torch.no_grad():
            for caption in captions:
                if caption not in text_cache:
                    hidden, pooled = encode([caption])
                    text_cache[caption] = (hidden[0], None if pooled is None else pooled[0])
        hidden = torch.stack([text_cache[c][0] for c in captions])
        pooled = None if family != SDXL else torch.stack([text_cache[c][1] for c in captions]).to(weight_dtype)
        return hidden, pooled

    def _resume(self, path: Path, trained, optimizer, lr_scheduler, generator):
        saved = checkpoints.load_checkpoint(path)
        previous = json.loads(saved.state["config"])
        changed = [key for key in RESUME_KEYS if previous.get(key) != getattr(self.config, key)]
        if changed:
            raise UserError(
                f"The checkpoint in {self.work_dir} was made with different settings ({', '.join(changed)}). "
                "Set resume = false (or --no-resume) to start over, or pick another name."
            )
        params = {f"{prefix}.{name}": p for prefix, module in trained.items()
                  for name, p in module.named_parameters() if p.requires_grad}
        missing = set(params) ^ set(saved.lora)
        if missing:
            raise UserError(f"Checkpoint {path} does not match this model ({len(missing)} LoRA weights differ).")
        with torch.no_grad():
            for key, parameter in params.items():
                parameter.copy_(saved.lora[key].to(parameter.device, parameter.dtype))
        optimizer.load_state_dict(saved.state["optimizer"])
        lr_scheduler.load_state_dict(saved.state["lr_scheduler"])
        generator.set_state(saved.state["generator"])
        losses = [(int(s), float(v)) for s, v in saved.state["losses"].tolist()]
        return saved.step, saved.epoch, saved.batch, losses

    def _export(self, trained, family, epochs_done, step, items, resolution, started_at, *, per_epoch: bool,
                accelerator) -> Path:
        config = self.config
        state = export.peft_state({k: accelerator.unwrap_model(m) for k, m in trained.items()})
        metadata = export.build_metadata(
            name=config.name if not per_epoch else f"{config.name}-e{epochs_done:04d}",
            family=family, rank=config.rank, alpha=config.alpha, trigger=config.trigger,
            captions=[item.caption for item in items], repeats=config.repeats, epochs=epochs_done, steps=step,
            resolution=(resolution, resolution), started_at=started_at, base_model=config.model,
            extra={"ss_unet_lr": str(config.unet_lr), "ss_text_encoder_lr": str(config.text_encoder_lr),
                   "ss_learning_rate": str(config.unet_lr), "ss_lr_scheduler": config.lr_scheduler,
                   "ss_max_train_steps": str(step), "ss_seed": str(config.seed),
                   "ss_min_snr_gamma": str(config.min_snr_gamma), "ss_noise_offset": str(config.noise_offset),
                   "ss_batch_size_per_device": str(config.batch_size), "ss_network_train_unet_only":
                   str(not config.train_text_encoder), "lorapg.preset": config.preset},
        )
        path = self.epochs_dir / f"{config.name}-e{epochs_done:04d}.safetensors" if per_epoch else self.lora_path
        return export.export_kohya(state, path, family=family, alpha=config.alpha, metadata=metadata,
                                   save_precision=config.save_precision)

    @torch.no_grad()
    def _sample(self, pipe, unet, accelerator, epoch, epochs, step, total_steps, resolution, weight_dtype) -> Path:
        config = self.config
        prompt = config.sample_prompt.replace("{trigger}", config.trigger) or config.trigger
        self.on_progress(TrainProgress("sample", epoch, epochs, step, total_steps,
                                       message=f"Epoch {epoch}: drawing a sample image…"))
        pipe.unet = accelerator.unwrap_model(unet)
        pipe.unet.eval()
        pipe.set_progress_bar_config(disable=True)
        device = accelerator.device
        autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 \
            else contextlib.nullcontext()
        with autocast:
            image = pipe(prompt=prompt, num_inference_steps=config.sample_steps, width=resolution, height=resolution,
                         generator=torch.Generator("cpu").manual_seed(config.sample_seed)).images[0]
        path = self.work_dir / "samples" / f"epoch-{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.on_progress(TrainProgress("sample", epoch, epochs, step, total_steps, sample=image,
                                       message=f"Epoch {epoch}: sample saved."))
        return path


def load_pixels_crop_only(item: TrainImage) -> None:
    """Set ``item.crop`` (needed for SDXL time ids) without decoding: the cache holds the latents."""
    width, height = item.bucket
    scale = max(width / item.size[0], height / item.size[1])
    resized = (max(width, round(item.size[0] * scale)), max(height, round(item.size[1] * scale)))
    item.crop = ((resized[1] - height) // 2, (resized[0] - width) // 2)


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
