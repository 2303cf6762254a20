"""Drawing a comparison grid: cells in rows (Y) and columns (X), axis titles and values drawn with
PIL's default font (lorapg ships no font files). The bands have fixed sizes, so a grid's size
depends only on the cells: ``grid_size`` says it, and long labels are cut to fit."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

HEADER_HEIGHT = 48  # two text lines above the cells: the title (Z value, X axis title), then the X values
LABEL_WIDTH = 128  # the column left of the cells: the Y axis title and each row's Y value
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)  # a cell a cancelled grid did not reach
INK = (0, 0, 0)
FONT_SIZE = 14


@dataclass(frozen=True)
class GridLabels:
    title: str  # the first header line: "Z axis title: value" and the X axis title
    x_values: list[str]
    y_title: str | None = None
    y_values: list[str] | None = None  # None: one row, no label column


def grid_size(cell: tuple[int, int], columns: int, rows: int, has_y: bool) -> tuple[int, int]:
    width, height = cell
    return (LABEL_WIDTH if has_y else 0) + columns * width, HEADER_HEIGHT + rows * height


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)  # Pillow's bundled scalable font (needs FreeType)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()  # the bitmap font


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut with an ellipsis so it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _text(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, font, *, centred: bool = False) -> None:
    """Draw ``text`` vertically centred on ``at`` (and horizontally with ``centred``); placed by its
    bounding box, since the bitmap fallback font has no anchors."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = at[0] - (right - left) // 2 - left if centred else at[0] - left
    draw.text((x, at[1] - (bottom - top) // 2 - top), text, fill=INK, font=font)


def render_grid(cells: list[list[Image.Image | None]], labels: GridLabels, cell: tuple[int, int]) -> Image.Image:
    """``cells[row][column]``; None draws a grey cell (not generated)."""
    rows, columns = len(cells), len(cells[0])
    has_y = labels.y_values is not None
    left = LABEL_WIDTH if has_y else 0
    grid = Image.new("RGB", grid_size(cell, columns, rows, has_y), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    line = HEADER_HEIGHT // 2
    _text(draw, (4, line // 2), _fit(draw, labels.title, font, grid.width - 8), font)
    for column, text in enumerate(labels.x_values):
        centre = left + column * cell[0] + cell[0] // 2
        _text(draw, (centre, line + line // 2), _fit(draw, text, font, cell[0] - 4), font, centred=True)
    if has_y:
        _text(draw, (4, line + line // 2), _fit(draw, labels.y_title or "", font, left - 8), font)
    for row, images in enumerate(cells):
        top = HEADER_HEIGHT + row * cell[1]
        if has_y:
            text = _fit(draw, labels.y_values[row], font, left - 8)
            _text(draw, (4, top + cell[1] // 2), text, font)
        for column, image in enumerate(images):
            box = (left + column * cell[0], top)
            if image is None:
                draw.rectangle((*box, box[0] + cell[0] - 1, box[1] + cell[1] - 1), fill=MISSING)
            else:
                grid.paste(image.convert("RGB").resize(cell) if image.size != cell else image.convert("RGB"), box)
    return grid
