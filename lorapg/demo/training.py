"""Train the demo model from nothing: first the VAE, then the UNet and text encoder together.

``python -m lorapg.demo train`` runs this recipe; it is seeded. On this project's 2-core machine it took
39.9 min with two threads (VAE 7.5, diffusion 32.2) and 59 min with one thread while the other core was
busy; that machine's speed varies (``bench/bench_demo_train.py`` times a slice of each stage).

The recipe follows Stable Diffusion's own: an ε-predicting UNet on
VAE latents under SD's noise schedule, min-SNR loss weighting, an EMA of the weights, and 10 % empty
captions so that classifier-free guidance works at inference.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline

from lorapg.demo import architecture
from lorapg.demo.shapes import random_colour_image, render, training_scenes
from lorapg.demo.vocabulary import MAX_LENGTH, write_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    threads: int = 1
    # VAE: reconstruction of arbitrary colours and outlines, a tiny KL term as in SD's VAE.
    vae_steps: int = 450
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_pool: int = 12000  # pre-drawn training images; batches are sampled from the pool
    kl_weight: float = 1e-6
    # Diffusion: UNet + text encoder trained jointly on cached latents.
    jitters_per_scene: int = 48
    diffusion_steps: int = 4200
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 300
    empty_caption_rate: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


class _Progress:
    """Logs about every 30 s: long CPU runs should show they are alive and how fast they go."""

    def __init__(self, stage: str, total: int, report: Callable[[str], None]):
        self.stage, self.total, self.report = stage, total, report
        self.started = self.last = time.monotonic()

    def step(self, step: int, detail: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= 30:
            self.last = now
            elapsed = now - self.started
            remaining = elapsed / (step + 1) * (self.total - step - 1)
            self.report(f"{self.stage} {step + 1}/{self.total} {detail} ({elapsed:.0f}s, ~{remaining:.0f}s left)")


def train_vae(recipe: Recipe, rng: np.random.Generator, report: Callable[[str], None]) -> AutoencoderKL:
    scenes = training_scenes()
    # Half arbitrary colours and outlines (so LoRAs can teach new ones), half the demo's own scenes.
    pool = np.stack(
        [
            random_colour_image(rng) if i % 2 == 0 else render(scenes[int(rng.integers(len(scenes)))], rng)
            for i in range(recipe.vae_pool)
        ]
    )
    check = _to_tensor(pool[:256])
    vae = architecture.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    progress = _Progress("vae", recipe.vae_steps, report)
    vae.train()
    for step in range(recipe.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.vae_lr * _lr_factor(step, recipe.vae_steps, 100)
        x = _to_tensor(pool[rng.integers(0, len(pool), size=recipe.vae_batch)])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        progress.step(step, f"loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        psnr = _psnr(vae.decode(vae.encode(check).latent_dist.mode()).sample, check)
    report(f"vae done: {psnr:.1f} dB PSNR on 256 training images")
    return vae


def _encode_dataset(vae: AutoencoderKL, recipe: Recipe, rng: np.random.Generator):
    """Cache each training image's latent distribution (mean, std); captions by scene index."""
    scenes = training_scenes()
    images, scene_index = [], []
    for index, scene in enumerate(scenes):
        for _ in range(recipe.jitters_per_scene):
            images.append(render(scene, rng))
            scene_index.append(index)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            dist = vae.encode(_to_tensor(np.stack(images[start : start + 256]))).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), torch.tensor(scene_index), [s.caption for s in scenes]


def train_diffusion(
    vae: AutoencoderKL, tokenizer, recipe: Recipe, rng: np.random.Generator, report: Callable[[str], None]
):
    means, stds, scene_index, captions = _encode_dataset(vae, recipe, rng)
    # SD scales latents to unit variance; this model's factor is measured, not SD's 0.18215.
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    report(f"{len(scene_index)} training images encoded; latent scaling factor {scaling:.4f}")

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    caption_ids, empty_ids = ids(captions), ids([""])[0]
    unet = architecture.build_unet()
    text_encoder = architecture.build_text_encoder(tokenizer)
    scheduler = architecture.training_scheduler()
    alphas = scheduler.alphas_cumprod
    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in trained]
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.01)
    progress = _Progress("diffusion", recipe.diffusion_steps, report)
    unet.train()
    text_encoder.train()
    generator = torch.Generator().manual_seed(recipe.seed)
    running = None
    for step in range(recipe.diffusion_steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe.diffusion_steps, recipe.warmup)
        pick = torch.from_numpy(rng.integers(0, len(scene_index), size=recipe.batch))
        latents = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=generator)) * scaling
        batch_ids = caption_ids[scene_index[pick]].clone()
        batch_ids[torch.from_numpy(rng.random(recipe.batch) < recipe.empty_caption_rate)] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(batch_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        # min-SNR-γ weighting (Hang et al. 2023) for ε-prediction: w = min(SNR, γ) / SNR.
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = torch.clamp(snr, max=recipe.snr_gamma) / snr
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, parameter in zip(ema, trained, strict=True):
                average.lerp_(parameter.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.step(step, f"loss {running:.4f}")
    with torch.no_grad():
        for average, parameter in zip(ema, trained, strict=True):
            parameter.copy_(average)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def train_demo_model(output: Path, recipe: Recipe = Recipe(), report: Callable[[str], None] = log.info) -> Path:
    """Train every component and save a diffusers folder (fp16 safetensors) at ``output``."""
    started = time.monotonic()
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    rng = np.random.default_rng(recipe.seed)
    report(f"recipe: {asdict(recipe)}")
    scratch = output.parent / f".{output.name}-tokenizer"
    tokenizer = write_tokenizer(scratch)
    vae = train_vae(recipe, rng, report)
    unet, text_encoder = train_diffusion(vae, tokenizer, recipe, rng, report)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=architecture.inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(output, safe_serialization=True)
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()
    report(f"saved {output} after {(time.monotonic() - started) / 60:.1f} min")
    return output
