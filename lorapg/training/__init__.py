"""The LoRA training engine: datasets, presets, a strict config, the trainer loop, checkpoints and export.

An engine, like ``diffusion/``: nothing here imports gradio, the job queue, visitors or Space hosting
code. The Train tab and ``python -m lorapg train`` both call ``lorapg.services.training.TrainingService``,
which runs this engine as a job.
"""
