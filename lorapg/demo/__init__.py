"""The bundled demo model: a tiny Stable Diffusion 1.x model of coloured shapes.

It exists so that the app runs offline on any CPU in seconds, and so that claims about images
(does the prompt work, does a LoRA teach what it was trained on) become numbers: every image it
should make can be drawn exactly by ``shapes.render`` and judged by ``judge.judge_image``.

A build tool (``python -m lorapg.demo``), not part of the runtime: the app, the CLI and the services
never import it; the tests and the build itself do.
"""
