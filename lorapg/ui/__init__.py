"""Gradio UI: one module per tab. Handlers turn widget values into a service call, nothing more."""
