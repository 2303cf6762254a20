"""Every parameter's range, in one place.

The Generate tab's sliders, the CLI's help, request validation, gallery Reuse and the training
config all read these, so a value one of them accepts is a value every other one accepts (a PNG
made at CFG 25 can be reused, and an API call at the slider's maximum is not refused).
Never imports gradio or torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """An inclusive range; ``step`` is the UI's granularity (validation does not snap to it)."""

    minimum: float
    maximum: float
    step: float
    default: float

    def __contains__(self, value: float) -> bool:
        return self.minimum <= value <= self.maximum

    def clamp(self, value: float) -> float:
        return min(max(value, self.minimum), self.maximum)

    def describe(self) -> str:
        """``"1–50"``: how messages and help texts say the range."""
        return f"{_number_text(self.minimum)}–{_number_text(self.maximum)}"


def _number_text(value: float) -> str:
    # Whole numbers in full (a seed is 4294967295, not 4.29497e+09); others as short as they go.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- generation -----------------------------------------------------------------------------
STEPS = Range(1, 50, 1, 30)
# A1111's slider goes to 30; PNGs made there must reuse unchanged.
CFG_SCALE = Range(0.0, 30.0, 0.5, 7.0)
# Width and height; 32: the bundled demo model is native 32 px. The default is the model's native size.
SIZE = Range(32, 2048, 8, 512)
SIZE_MULTIPLE = 8  # the VAE downsamples by 8
BATCH_SIZE = Range(1, 4, 1, 1)
LORA_SCALE = Range(0.0, 1.5, 0.05, 1.0)
RANDOM_SEED = -1  # the seed field's "pick one at random" value, just below SEED.minimum
SEED = Range(0, 2**32 - 1, 1, RANDOM_SEED)
# A1111's "Clip skip" (setting CLIP_stop_at_last_layers): 1 = the last layer, its slider goes to 12.
CLIP_SKIP = Range(1, 12, 1, 1)
# A1111's "Variation strength" (subseed_strength): 0 = the seed's own image, 1 = the variation seed's noise.
VARIATION_STRENGTH = Range(0.0, 1.0, 0.01, 0.0)

# img2img and inpainting (A1111's ranges). Denoising strength 0 keeps the init image; 1 repaints it all.
DENOISING_STRENGTH = Range(0.0, 1.0, 0.01, 0.75)
MASK_BLUR = Range(0, 64, 1, 4)  # pixels (a Gaussian's sigma), as A1111's slider
INPAINT_PADDING = Range(0, 256, 4, 32)  # "only masked": pixels added around the mask's box
# A1111's resize_mode values: how an init image of another size becomes width x height.
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill", 3: "Just resize (latent upscale)"}
# A1111's inpainting_fill ("Masked content"): what the masked area starts from.
INPAINTING_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}

# Hires fix (A1111's txt2img "Hires. fix"): the upscale factor, the second pass's steps (0 = the
# first pass's) and its denoising strength (DENOISING_STRENGTH's range, A1111's default 0.7).
HIRES_SCALE = Range(1.0, 4.0, 0.05, 2.0)
HIRES_STEPS = Range(0, STEPS.maximum, 1, 0)
HIRES_STRENGTH_DEFAULT = 0.7
# The built-in upscalers a hires pass can use: latents resized bilinearly (A1111's default) or by
# nearest neighbour, or the decoded image resized with Lanczos ("None", "Lanczos") or by nearest
# neighbour ("Nearest"). Upscaler models (models/upscalers, lorapg.diffusion.upscalers) come after these.
HIRES_UPSCALERS = ("Latent", "Latent (nearest)", "None", "Lanczos", "Nearest")

# ControlNet (A1111's sd-webui-controlnet units): how strongly each unit steers, over which part of
# the steps (fractions: 0 = the first step, 1 = the last), and the canny edge thresholds (0-255 grey levels).
CONTROL_WEIGHT = Range(0.0, 2.0, 0.05, 1.0)
CONTROL_GUIDANCE_START = Range(0.0, 1.0, 0.01, 0.0)
CONTROL_GUIDANCE_END = Range(0.0, 1.0, 0.01, 1.0)
CONTROL_THRESHOLD = Range(1, 255, 1, 100)
CONTROL_UNITS = 3  # A1111's default "Multi-ControlNet: ControlNet unit number"
# The preprocessors ("modules") this app runs; ``none`` takes the control image as it is.
CONTROL_PREPROCESSORS = ("none", "canny", "depth")
# The control image's resize modes (the extension's "Just Resize", "Crop and Resize", "Resize and Fill").
CONTROL_RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill"}

# --- training (TrainConfig fields) ------------------------------------------------------------
# A training seed is a generation seed: a sample made at it can be regenerated.
TRAINING: dict[str, Range] = {
    "rank": Range(1, 256, 1, 16),
    "alpha": Range(0.01, 1024, 0.01, 8.0),
    "unet_lr": Range(1e-7, 1.0, 1e-5, 1e-4),
    "text_encoder_lr": Range(0.0, 1.0, 1e-5, 5e-5),
    "epochs": Range(1, 1000, 1, 10),
    "max_steps": Range(0, 1_000_000, 1, 0),
    "repeats": Range(1, 100, 1, 1),
    "batch_size": Range(1, 64, 1, 1),
    "resolution": Range(0, SIZE.maximum, SIZE_MULTIPLE, 0),
    "prior_loss_weight": Range(0, 10, 0.1, 1.0),
    "lr_warmup_steps": Range(0, 100_000, 1, 0),
    "min_snr_gamma": Range(0, 100, 0.5, 0.0),
    "noise_offset": Range(0, 1, 0.01, 0.0),
    "max_grad_norm": Range(0, 1000, 0.1, 1.0),
    "seed": Range(SEED.minimum, SEED.maximum, 1, 42),
    "save_every_epochs": Range(1, 1000, 1, 1),
    "keep_checkpoints": Range(1, 100, 1, 2),
    "sample_steps": Range(0, 150, 1, 20),
    "sample_seed": Range(SEED.minimum, SEED.maximum, 1, 1234),
    "keep_tokens": Range(0, 100, 1, 1),
    "caption_dropout": Range(0, 1, 0.01, 0.0),
}

# --- upscaling (A1111's Extras: "Resize" / upscaling_resize) ------------------------------------
UPSCALE_BY = Range(1.0, 8.0, 0.05, 4.0)
# A1111's extras_upscaler_2_visibility: how much of a second upscaler is blended in (refused above 0 here).
UPSCALER_2_VISIBILITY = Range(0.0, 1.0, 0.001, 0.0)
