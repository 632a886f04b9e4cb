"""The cohort plot: one strip per measure (tiles per slide, lung volume per scan, ...), a dot
per sample over its quartile box, outliers in red with their names.

Drawn with Pillow at twice the size and scaled down, which smooths the dots and text.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medprep.common import atomic
from medprep.common.statuses import FAILED, status_counts


@dataclass(frozen=True)
class Panel:
    modality: str
    column: str
    title: str


PANELS = (
    Panel("wsi", "kept", "Tiles kept per slide"),
    Panel("wsi", "tissue_area_mm2", "Tissue area per slide (square mm)"),
    Panel("ct", "lung_volume_ml", "Lung volume per CT scan (ml)"),
    Panel("ct", "kept", "Patches kept per CT scan"),
)

SCALE = 2  # drawn at twice the size, then scaled down
WIDTH = 1000
HEADER = 64
PANEL_HEIGHT = 150
LEFT, RIGHT = 40, 40
MAX_NAMED_OUTLIERS = 8
MIN_VALUES_FOR_FENCES = 4

INK = (31, 41, 51)
MUTED = (98, 125, 152)
GRID = (217, 226, 236)
BOX = (222, 232, 244)
MEDIAN = (51, 78, 104)
DOT = (72, 101, 129, 150)
OUTLIER = (214, 69, 69, 255)


def outliers(values: dict[str, float]) -> set[str]:
    """Samples whose value is zero, or beyond 1.5 interquartile ranges of the quartiles
    (Tukey's fences; only with at least four values, fewer have no meaningful quartiles)."""
    flagged = {name for name, value in values.items() if value == 0}
    if len(values) >= MIN_VALUES_FOR_FENCES:
        q1, q3 = np.percentile(list(values.values()), [25, 75])
        low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        flagged |= {name for name, value in values.items() if value < low or value > high}
    return flagged


def nice_ticks(high: float, count: int = 6) -> list[float]:
    """Ticks from 0 to at least ``high`` at a step of 1, 2 or 5 times a power of ten."""
    raw = max(high, 1e-9) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(high / step - 1e-9)) + 1)]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size * SCALE)


def _format(value: float) -> str:
    if value == int(value) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _panel_values(rows: list[dict[str, Any]], panel: Panel) -> tuple[dict[str, float], int]:
    """Values of the panel's finished samples, and how many of its samples failed."""
    values: dict[str, float] = {}
    failed = 0
    for row in rows:
        if row["modality"] != panel.modality:
            continue
        if row["status"] == FAILED:
            failed += 1
        elif row[panel.column] is not None:
            values[row["sample"]] = float(row[panel.column])
    return values, failed


def _jitter(name: str, height: float) -> float:
    """A stable vertical offset in [0, height): the same sample sits at the same place."""
    return (zlib.crc32(name.encode()) % 1000) / 1000 * height


class _Canvas:
    def __init__(self, height: int) -> None:
        self.image = Image.new("RGB", (WIDTH * SCALE, height * SCALE), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")

    def text(self, xy, text, size=13, fill=INK, anchor="la") -> None:
        x, y = xy
        self.draw.text((x * SCALE, y * SCALE), text, font=_font(size), fill=fill, anchor=anchor)

    def line(self, points, fill, width=1) -> None:
        self.draw.line([(x * SCALE, y * SCALE) for x, y in points], fill=fill, width=width * SCALE)

    def rectangle(self, box, fill) -> None:
        x0, y0, x1, y1 = box
        self.draw.rectangle((x0 * SCALE, y0 * SCALE, x1 * SCALE, y1 * SCALE), fill=fill)

    def dot(self, x, y, radius, fill) -> None:
        r = radius * SCALE
        self.draw.ellipse((x * SCALE - r, y * SCALE - r, x * SCALE + r, y * SCALE + r), fill=fill)

    def finish(self) -> Image.Image:
        return self.image.resize(
            (self.image.width // SCALE, self.image.height // SCALE), Image.Resampling.LANCZOS
        )


def _draw_header(canvas: _Canvas, rows: list[dict[str, Any]]) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in status_counts(rows))
    canvas.text((LEFT, 14), f"Cohort: {len(rows)} samples ({counts})", size=17)
    y = 46
    canvas.dot(LEFT + 5, y, 4, DOT)
    canvas.text((LEFT + 14, y), "sample", size=12, fill=MUTED, anchor="lm")
    canvas.dot(LEFT + 80, y, 5, OUTLIER)
    canvas.text(
        (LEFT + 90, y),
        "outlier: zero, or beyond 1.5 interquartile ranges",
        size=12,
        fill=MUTED,
        anchor="lm",
    )
    canvas.rectangle((LEFT + 420, y - 6, LEFT + 450, y + 6), BOX)
    canvas.line([(LEFT + 435, y - 6), (LEFT + 435, y + 6)], MEDIAN, 2)
    canvas.text(
        (LEFT + 458, y),
        "middle half of the samples, median",
        size=12,
        fill=MUTED,
        anchor="lm",
    )


def _draw_panel(canvas: _Canvas, top: int, panel: Panel, rows: list[dict[str, Any]]) -> None:
    values, failed = _panel_values(rows, panel)
    flagged = outliers(values)
    notes = [f"{len(values)} samples"]
    if values:
        notes.append(f"median {_format(float(np.median(list(values.values()))))}")
    if flagged:
        notes.append(f"{len(flagged)} outlier{'s' * (len(flagged) != 1)}")
    if failed:
        notes.append(f"{failed} failed (not shown)")
    canvas.text((LEFT, top + 8), panel.title, size=15)
    canvas.text((WIDTH - RIGHT, top + 8), " · ".join(notes), size=12, fill=MUTED, anchor="ra")

    band_top, band_bottom, axis_y = top + 42, top + 104, top + 112
    if not values:
        canvas.text((LEFT, band_top + 20), "no finished samples", size=13, fill=MUTED)
        return
    ticks = nice_ticks(max(values.values()))
    span = ticks[-1] or 1.0

    def x_of(value: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * value / span

    for tick in ticks:
        canvas.line([(x_of(tick), band_top - 4), (x_of(tick), axis_y)], GRID)
        canvas.text((x_of(tick), axis_y + 4), _format(tick), size=11, fill=MUTED, anchor="ma")
    canvas.line([(LEFT, axis_y), (WIDTH - RIGHT, axis_y)], MUTED)

    if len(values) >= MIN_VALUES_FOR_FENCES:
        q1, median, q3 = np.percentile(list(values.values()), [25, 50, 75])
        canvas.rectangle((x_of(q1), band_top, max(x_of(q3), x_of(q1) + 1), band_bottom), BOX)
        canvas.line([(x_of(median), band_top), (x_of(median), band_bottom)], MEDIAN, 2)

    inner = band_bottom - band_top - 12
    for name, value in values.items():
        if name not in flagged:
            canvas.dot(x_of(value), band_top + 6 + _jitter(name, inner), 4, DOT)
    named = sorted(flagged, key=lambda n: values[n])
    for i, name in enumerate(named):
        x, y = x_of(values[name]), band_top + 6 + _jitter(name, inner)
        canvas.dot(x, y, 5, OUTLIER)
        if i < MAX_NAMED_OUTLIERS:
            anchor = "ld" if x < WIDTH / 2 else "rd"
            canvas.text((x + (7 if anchor == "ld" else -7), y - 5), name, size=12, anchor=anchor)
    if len(named) > MAX_NAMED_OUTLIERS:
        canvas.text(
            (WIDTH - RIGHT, band_bottom - 2),
            f"+{len(named) - MAX_NAMED_OUTLIERS} more outliers in the table",
            size=11,
            fill=MUTED,
            anchor="rd",
        )


def render_plot(rows: list[dict[str, Any]]) -> Image.Image:
    modalities = {row["modality"] for row in rows}
    panels = [panel for panel in PANELS if panel.modality in modalities]
    canvas = _Canvas(HEADER + PANEL_HEIGHT * max(len(panels), 1))
    _draw_header(canvas, rows)
    for i, panel in enumerate(panels):
        _draw_panel(canvas, HEADER + i * PANEL_HEIGHT, panel, rows)
    return canvas.finish()


def write_plot(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    atomic.write_png(path, render_plot(rows))
