"""A contact sheet of the demo model's images (for the README and the model card)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from lorapg.demo.evaluate import generate
from lorapg.demo.shapes import Scene

CELL = 128  # each 32 px image is shown 4× larger, pixels kept sharp
LABEL = 30


def contact_sheet(
    engine, scenes: list[Scene], columns: int = 5, seed: int = 0, loras: tuple[tuple[str, float], ...] = ()
) -> Image.Image:
    rows = (len(scenes) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, scene in enumerate(scenes):
        image = generate(engine, scene.caption, seed + index, 1, loras)[0]
        x, y = (index % columns) * CELL, (index // columns) * (CELL + LABEL)
        sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y))
        words = scene.caption.removeprefix("a ").replace(" background", "")
        top, bottom = words.split(" on a ")
        draw.text((x + 4, y + CELL + 2), top, fill="black")
        draw.text((x + 4, y + CELL + 15), f"on {bottom}", fill="black")
    return sheet
