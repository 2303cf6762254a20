"""Comparison grids (A1111's X/Y/Z plot): axis parsing (axes.py) and drawing (render.py). No torch, no gradio."""
