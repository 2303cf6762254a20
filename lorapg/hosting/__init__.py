"""Hosting the app for visitors on a Hugging Face Space.

- ``zerogpu``: the ZeroGPU relay (``GpuTask``); imported by ``app.py`` before torch.
- ``space_policy``: what a Space changes (visitors kept apart, upload and training limits, locked settings).
- ``visitors``: who is asking, a stable id per visitor without accounts.
- ``gpu_estimates``: the GPU seconds a request reserves from a visitor's ZeroGPU quota.

Kept import-light on purpose (no torch here): ``app.py`` imports ``lorapg.hosting.zerogpu`` first.
"""
