"""LoRA training: datasets, presets, a strict config, the trainer loop, checkpoints and export.

Nothing here imports gradio; the Train tab and ``python -m lorapg train`` both call
``lorapg.training.service.TrainingService``.
"""
