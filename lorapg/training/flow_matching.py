"""LoRA training for the transformer families (Flux.1, SD 3.5): what differs from the UNet path.

Modelled on diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` and ``..._sd3.py``:

- LoRA (peft) on the transformer's attention projections, with the target modules those scripts use;
- rectified-flow loss: ``u`` drawn by ``compute_density_for_timestep_sampling`` (logit-normal, mode or
  uniform), the timestep and sigma at ``u`` of the FlowMatchEulerDiscreteScheduler's schedule (its
  config's shift already applied to its sigmas), ``noisy = (1 - σ)·x + σ·ε``, target ``ε - x``, each
  element weighted by ``compute_loss_weighting_for_sd3``. The velocity target ``ε - x`` is what
  diffusers' Flux script, kohya sd-scripts and ai-toolkit train (for SD 3.5 too). diffusers' SD 3 script
  differs by default (``--precondition_outputs 1``): it compares ``noisy - σ·v`` with ``x``, which is
  this loss times σ², so it weights the noisier timesteps more; that variant is not offered here;
- Flux: latents packed 2×2 into tokens, latent image ids, timestep ÷ 1000, and for dev (a
  guidance-distilled model) the guidance input;
- the text embeddings of every caption (and of the sample prompt) computed once before the loop, so
  the T5 and CLIP encoders leave the training device (``release_text_encoders``);
- optionally (``train_text_encoder``, the scripts' ``--train_text_encoder``) a LoRA on the CLIP encoders'
  attention projections: Flux.1's CLIP-L (``text_encoder``), SD 3.5's two (``text_encoder``,
  ``text_encoder_2``); T5 is never trained. The CLIP part of every batch's embeddings (Flux: the pooled
  embedding; SD 3: the first tokens of the hidden states and the pooled embedding) is then computed per
  step with gradients, while T5's part is still read from the cache, so T5 still leaves the device.

The trainer (``lorapg.training.trainer``) keeps the shared machinery: data, buckets, latent cache,
accelerator, optimizer, checkpoints, resume, cancel, per-epoch files. It calls a ``FlowTraining`` where
the families differ. Randomness is per sample from its noise seed, as in the UNet path, so a resumed
run reaches the uninterrupted run's weights.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch

from lorapg.diffusion.families import FLUX, SD3, family_label
from lorapg.diffusion.flux import family_defaults, is_guidance_distilled, native_size, pipeline_kwargs
from lorapg.errors import UserError
from lorapg.training.cropping import bucket_step

log = logging.getLogger(__name__)

# diffusers' train_dreambooth_lora_flux.py default lora_layers: the attention projections of the
# double blocks (image and text streams) and the single blocks' attention, plus the feed-forwards.
FLUX_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
# diffusers' train_dreambooth_lora_sd3.py default lora_layers: the joint attention's projections.
SD3_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
# TrainConfig.weighting_scheme -> diffusers' name (its "none" is a uniform u with weight 1).
DIFFUSERS_SCHEME = {"uniform": "none"}
# Real Flux.1 / SD 3.5: an 8x VAE and 2x2 patches (Flux packs 2x2 latents into a token) -> sides of 16 px.
REAL_MULTIPLE = 16


# The CLIP encoders a text-encoder LoRA trains, by pipeline attribute (also the exported keys' prefix):
# diffusers' Flux script trains CLIP-L only (T5 is too large), its SD 3 script both CLIP encoders.
TRAINED_TEXT_ENCODERS = {FLUX: ("text_encoder",), SD3: ("text_encoder", "text_encoder_2")}


def refuse_unusable_settings(config, family: str) -> None:
    """UserError for a setting that does not exist for ``family``'s transformer; checked before loading
    (TrainingService.prepare, when the family is known then) and again once the model is loaded."""
    label = family_label(family)
    if config.train_conv:
        raise UserError(f"Train conv (train_conv) applies to SD UNets only: turn it off for {label}.")


FLOW_FIELDS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")


def warn_unused_flow_settings(config, family: str) -> list[str]:
    """Log (once per run) the flow-matching settings an SD 1.x/SDXL run ignores: its UNet trains on the
    DDPM noise schedule, as FlowTraining ignores SD's min_snr_gamma/noise_offset. Returns their names."""
    defaults = type(config)()
    unused = [key for key in FLOW_FIELDS if getattr(config, key) != getattr(defaults, key)]
    for key in unused:
        log.warning(
            "%s (--%s) applies to Flux.1 / SD 3.5 (flow matching); ignored for %s",
            key,
            key.replace("_", "-"),
            family_label(family),
        )
    return unused


def family_geometry(family: str, resolution: int, native: int, multiple: int = REAL_MULTIPLE) -> tuple[int, int]:
    """(training side, bucket multiple) for ``family``: ``resolution`` or the ``native`` size; sides
    divide by ``multiple`` (the VAE factor × the transformer's patch; the real models' 16 px by default,
    for an estimate made before the model is loaded)."""
    side = resolution or native
    if side % multiple:
        nearest = max(multiple, round(side / multiple) * multiple)
        raise UserError(
            f"Resolution {side} is not usable for {family_label(family)}: "
            f"it must be a multiple of {multiple} (try {nearest})."
        )
    return side, bucket_step(side, multiple)


def pipeline_geometry(pipe, family: str, resolution: int) -> tuple[int, int]:
    """``family_geometry`` of a loaded Flux.1 / SD 3.5 pipeline: its own VAE factor, patch and native size."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = 2 if family == FLUX else int(pipe.transformer.config.get("patch_size", 1))
    return family_geometry(family, resolution, native_size(pipe, family), vae_scale * patch)


class FlowTraining:
    """The family-specific parts of one Flux.1 / SD 3.5 training run."""

    # Benchmark switch (bench/bench_flux.py), not a setting: encode every batch's captions through
    # ``_encode`` instead of reading the cache, to measure what the cache saves. The encoders then stay.
    encode_every_step = False

    def __init__(self, pipe, family: str, config):
        self.pipe, self.family, self.config = pipe, family, config
        self.label = family_label(family)
        self.transformer_config = pipe.transformer.config
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        # Flux dev's distilled guidance is an input of the transformer; schnell (and SD 3) have none.
        self.guidance = family == FLUX and bool(self.transformer_config.get("guidance_embeds", False))
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # caption -> (hidden, pooled)
        self.encoders_released = False
        # train_text_encoder: pipeline attribute -> the trained CLIP encoder as the loop calls it (set by
        # ``use_trained_text_encoders`` once the LoRA is added and the accelerator has prepared it).
        self.trained_encoders: dict[str, Any] = {}
        self._check_config(config)

    # --- what the family can train ----------------------------------------------------------------

    def _check_config(self, config) -> None:
        """Refuse settings that do not exist for a transformer; SD-only loss settings are ignored, said once."""
        refuse_unusable_settings(config, self.family)
        for key in ("min_snr_gamma", "noise_offset"):
            if getattr(config, key):
                log.warning("%s applies to SD's noise schedule; ignored for %s (flow matching)", key, self.label)

    @property
    def targets(self) -> list[str]:
        return FLUX_TARGETS if self.family == FLUX else SD3_TARGETS

    def geometry(self, resolution: int) -> tuple[int, int]:
        """(training side, bucket multiple): sides divide by the VAE factor × the transformer's patch
        (Flux packs 2×2 latents into one token: 16 px for the real model)."""
        return pipeline_geometry(self.pipe, self.family, resolution)

    def text_encoders(self) -> list[Any]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipe, name) for name in names if getattr(self.pipe, name, None) is not None]

    def trainable_text_encoders(self) -> dict[str, Any]:
        """The CLIP encoders ``train_text_encoder`` adds a LoRA to, by pipeline attribute."""
        return {name: getattr(self.pipe, name) for name in TRAINED_TEXT_ENCODERS[self.family]}

    def use_trained_text_encoders(self, encoders: dict[str, Any]) -> None:
        """From now on the CLIP part of every batch's (and sample's) embeddings comes from ``encoders``
        (the accelerator-prepared ones: under DDP their wrappers average the gradients)."""
        self.trained_encoders = dict(encoders)

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # A copy: the pipeline's scheduler has its timesteps reset by every sample drawn.
        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    # --- text embeddings ------------------------------------------------------------------------

    def _max_sequence_length(self) -> int:
        # The generation path's rule (lorapg.diffusion.flux), so training sees the prompts' length it will meet.
        request = SimpleNamespace(prompt="", guidance_scale=0.0, negative_prompt="")
        return pipeline_kwargs(self.pipe, request)["max_sequence_length"]

    @torch.no_grad()
    def _encode(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, pooled embedding) by the pipeline's own ``encode_prompt``, as it generates."""
        length = self._max_sequence_length()
        if self.family == FLUX:
            hidden, pooled, _ = self.pipe.encode_prompt(
                captions, captions, device=device, num_images_per_prompt=1, max_sequence_length=length
            )
        else:
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                captions,
                captions,
                captions,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                max_sequence_length=length,
            )
        return hidden, pooled

    def cache_text(self, captions: list[str], device) -> None:
        """Each distinct caption's embeddings, kept on the CPU (a few MB each for FLUX.1's T5)."""
        for caption in dict.fromkeys(captions):
            if caption not in self.text_cache:
                hidden, pooled = self._encode([caption], device)
                self.text_cache[caption] = (hidden[0].cpu(), pooled[0].cpu())

    def release_text_encoders(self) -> None:
        """Move the CLIP and T5 encoders off the training device once every prompt is encoded.

        They go to the CPU (not deleted: the trainer's pipeline still owns them) and the CUDA cache is
        emptied, so the GPU holds only the transformer, the VAE and the LoRA during training — for
        FLUX.1 that frees T5-XXL's ~9.5 GB (bf16). Nothing encodes text after this point: the loop and
        the sample images read the cache.
        """
        if self.encode_every_step:
            return
        # Encoders being trained stay: the loop runs them every step (T5, never trained, still leaves).
        kept = self.trainable_text_encoders().values() if self.config.train_text_encoder else ()
        for encoder in self.text_encoders():
            if not any(encoder is k for k in kept):
                encoder.to("cpu")
        self.encoders_released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def embeddings(
        self, captions: list[str], device, dtype, encoders: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's (hidden, pooled): from the cache, or encoded now when captions vary per step; with
        trained CLIP encoders (``encoders``, by default the loop's), their part computed now (with
        gradients when grad mode is on) and only T5's part read or encoded."""
        encoders = self.trained_encoders if encoders is None else encoders
        if not encoders:
            return self._frozen_embeddings(captions, device, dtype)
        return self._with_trained_clip(captions, self._t5_part(captions, device, dtype), encoders, device)

    def _missing(self, captions: list[str]) -> list[str]:
        """The captions to encode now (not cached: shuffled tags, caption dropout; all when benchmarking)."""
        missing = [c for c in captions if c not in self.text_cache or self.encode_every_step]
        if missing and self.encoders_released:
            raise RuntimeError(f"caption not encoded before the text encoders left the device: {missing[0]!r}")
        return missing

    def _frozen_embeddings(self, captions: list[str], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._missing(captions):  # shuffled tags / caption dropout: the encoders stay on the device for these
            hidden, pooled = self._encode(captions, device)
            return hidden.to(dtype), pooled.to(dtype)
        hidden = torch.stack([self.text_cache[c][0] for c in captions]).to(device, dtype)
        pooled = torch.stack([self.text_cache[c][1] for c in captions]).to(device, dtype)
        return hidden, pooled

    def _t5_part(self, captions: list[str], device, dtype) -> torch.Tensor:
        """T5's part of the batch's hidden states: Flux.1's whole sequence, SD 3's tokens after the CLIP
        ones. Cached, or encoded by T5 alone on a miss: the trained CLIP encoders compute the rest anyway."""
        if self._missing(captions):
            return self._encode_t5(captions, device).to(dtype)
        clip_tokens = 0 if self.family == FLUX else self.pipe.tokenizer_max_length
        return torch.stack([self.text_cache[c][0][clip_tokens:] for c in captions]).to(device, dtype)

    @torch.no_grad()
    def _encode_t5(self, captions: list[str], device) -> torch.Tensor:
        # The helper both pipelines' encode_prompt calls for T5 (SD 3's gives zeros without a T5 encoder).
        length = self._max_sequence_length()
        return self.pipe._get_t5_prompt_embeds(
            prompt=captions, num_images_per_prompt=1, max_sequence_length=length, device=device
        )

    def _with_trained_clip(self, captions, t5: torch.Tensor, encoders, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, pooled) from T5's part and ``encoders``' output, computed as the pipeline's
        ``encode_prompt`` does: Flux.1 reads only CLIP's pooled output (its hidden states are T5's);
        SD 3 reads both encoders' penultimate layer (concatenated, zero-padded to T5's width, the first
        tokens of the sequence) and their projected pooled outputs, concatenated."""
        # Both CLIP tokenizers pad to the pipeline's tokenizer_max_length (the first one's), as it encodes.
        length = self.pipe.tokenizer_max_length
        tokenizers = {"text_encoder": self.pipe.tokenizer, "text_encoder_2": getattr(self.pipe, "tokenizer_2", None)}
        if self.family == FLUX:
            ids = _clip_ids(tokenizers["text_encoder"], captions, length, device)
            output = encoders["text_encoder"](ids, output_hidden_states=False)
            return t5, output.pooler_output.to(t5.dtype)
        layers, pools = [], []
        for name in TRAINED_TEXT_ENCODERS[SD3]:
            ids = _clip_ids(tokenizers[name], captions, length, device)
            output = encoders[name](ids, output_hidden_states=True)
            pools.append(output[0])  # CLIPTextModelWithProjection's text_embeds
            layers.append(output.hidden_states[-2])  # SD 3 (no clip skip) reads the penultimate layer
        clip = torch.cat(layers, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat(pools, dim=-1).to(t5.dtype)

    # --- the loss -------------------------------------------------------------------------------

    def draw(self, scheduler, shape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample's (noise, timestep, sigma) from its own seed, on the CPU (the same on every device)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        config = self.config
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=DIFFUSERS_SCHEME.get(config.weighting_scheme, config.weighting_scheme),
            batch_size=1,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            generator=generator,
        )
        count = scheduler.config.num_train_timesteps
        index = (u * count).long().clamp(0, count - 1)
        return noise, scheduler.timesteps[index], scheduler.sigmas[index]

    def loss(self, run, latents: torch.Tensor, captions: list[str], seeds: list[int]) -> torch.Tensor:
        """Each sample's weighted MSE between the transformer's velocity and ``ε - x`` (the velocity
        target of diffusers' Flux script, kohya and ai-toolkit; not the SD 3 script's default
        preconditioned x₀ target, which is this loss × σ²: see the module's docstring)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        device, dtype = latents.device, run.weight_dtype
        draws = [self.draw(run.noise_scheduler, latents.shape[1:], seed) for seed in seeds]
        noise = torch.stack([d[0] for d in draws]).to(device)
        timesteps = torch.cat([d[1] for d in draws]).to(device)
        sigmas = torch.cat([d[2] for d in draws]).to(device).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        hidden, pooled = self.embeddings(captions, device, dtype)
        prediction = self._predict(run.unet, noisy.to(dtype), timesteps, hidden, pooled)
        target = noise - latents
        scheme = DIFFUSERS_SCHEME.get(self.config.weighting_scheme, self.config.weighting_scheme)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
        return (weighting.float() * (prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))

    def _predict(self, transformer, noisy, timesteps, hidden, pooled) -> torch.Tensor:
        if self.family == SD3:
            return transformer(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.guidance:
            guidance = torch.full((batch,), float(self.config.guidance_scale), device=noisy.device)
        prediction = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux's transformer reads t in [0, 1]
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        pixels = (height * self.vae_scale, width * self.vae_scale)
        return FluxPipeline._unpack_latents(prediction, pixels[0], pixels[1], self.vae_scale)

    # --- samples and metadata -------------------------------------------------------------------

    def cache_sample_prompt(self, prompt: str, device) -> None:
        # SD 3 samples with classifier-free guidance: the empty prompt is its negative.
        self.cache_text([prompt] + ([""] if self.family == SD3 else []), device)

    def draw_sample(self, transformer, prompt: str, steps: int, size: int, generator, device, encoders=None):
        """One sample image through a pipeline without text encoders (they may be off the device).

        ``encoders``: the trained CLIP encoders to run, unwrapped: the main process draws samples alone,
        and a DDP wrapper's forward could start a collective the other processes never join."""
        pipe = self._sampling_pipeline(transformer)
        hidden, pooled = self.embeddings([prompt], device, transformer.dtype, encoders)
        kwargs = {"prompt_embeds": hidden, "pooled_prompt_embeds": pooled}
        if self.family == SD3:
            negative, negative_pooled = self.embeddings([""], device, transformer.dtype, encoders)
            kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        defaults = family_defaults(self.family, self.pipe)
        return pipe(
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=defaults.guidance_scale,
            generator=generator,
            max_sequence_length=self._max_sequence_length(),
            **kwargs,
        ).images[0]

    def _sampling_pipeline(self, transformer):
        components = dict(self.pipe.components, transformer=transformer)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if name in components:
                components[name] = None
        pipe = type(self.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def metadata(self) -> dict[str, str]:
        """What the LoRA's metadata says about the family and the flow-matching run: the modelspec
        architecture and kohya base model version as sd-scripts' sai_model_spec names them, and the
        timestep sampling under kohya's flow-matching names. The SD-only loss settings were not applied."""
        config = self.config
        metadata = {
            "ss_timestep_sampling": config.weighting_scheme,
            "ss_logit_mean": str(config.logit_mean),
            "ss_logit_std": str(config.logit_std),
            "ss_mode_scale": str(config.mode_scale),
            "ss_min_snr_gamma": "0",
            "ss_noise_offset": "0",
        }
        if self.family == FLUX:
            variant = "flux-1-dev" if is_guidance_distilled(self.pipe) else "flux-1-schnell"
            if self.guidance:
                metadata["ss_guidance_scale"] = str(config.guidance_scale)
            return metadata | {"modelspec.architecture": f"{variant}/lora", "ss_base_model_version": "flux1"}
        medium = bool(self.transformer_config.get("dual_attention_layers", ()))
        variant = "stable-diffusion-v3.5-medium" if medium else "stable-diffusion-v3.5-large"
        return metadata | {"modelspec.architecture": f"{variant}/lora", "ss_base_model_version": "sd3"}


def _clip_ids(tokenizer, captions: list[str], length: int, device) -> torch.Tensor:
    """Token ids as the pipelines' ``_get_clip_prompt_embeds`` make them (padded to ``length``)."""
    return tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
