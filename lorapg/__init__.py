"""LoRA Playground: Stable Diffusion with LoRA adapters, prompt tools, gallery and trainer."""

__version__ = "0.1.0"
