"""One picture per case: the inputs with their saliency maps, the table given, the probabilities and what the
model completed, with "RESEARCH USE ONLY" drawn into the pixels.

Drawn with matplotlib's Agg canvas (no pyplot: no backend change, safe in the listener's thread) at a fixed
size (:data:`PAGE_SIZE`). The PNG is written by Pillow without any text chunk, so the file holds the pixels
and nothing else; the page names the case by the id it is given (an id or a pseudonym, never a patient
attribute). 2D: each photo with its map over it; 3D: the three orthogonal slices through the map's maximum.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cmml_monai.data.jsonio import atomic_path, atomic_write_text
from cmml_monai.data.table import is_empty_cell
from cmml_monai.evaluation.explain import PRESENT, CaseExplanation

__all__ = [
    "PAGE_SIZE",
    "RESEARCH_USE_ONLY",
    "orthogonal_slices",
    "render_page",
    "save_page",
    "read_page",
    "write_index",
]

#: (width, height) of every page in pixels
PAGE_SIZE = (1400, 1000)
RESEARCH_USE_ONLY = "RESEARCH USE ONLY \u2014 not for diagnostic use"
_DPI = 100
_COMPLETED_COLOUR = "#d9822b"
_NOT_USED_COLOUR = "#7a7a7a"


def _display(image: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """A modality's input ``[C, *spatial]`` as displayable values: RGB in [0, 1] (normalisation undone when
    ``mean``/``std`` are known) or one grey channel scaled by its 1st-99th percentiles."""
    if image.shape[0] == 3 and mean is not None and std is not None:
        m = np.asarray(mean, np.float32).reshape(3, *[1] * (image.ndim - 1))
        s = np.asarray(std, np.float32).reshape(3, *[1] * (image.ndim - 1))
        return np.clip(image * s + m, 0.0, 1.0)
    grey = image.mean(axis=0, keepdims=True) if image.shape[0] != 3 else image
    lo, hi = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    return np.clip((grey - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def _overlay(ax: Any, picture: np.ndarray, saliency: np.ndarray, title: str) -> None:
    """``picture`` ``[C, H, W]`` with the map drawn over it (opacity grows with the map's value)."""
    rgb = np.moveaxis(picture, 0, -1) if picture.shape[0] == 3 else picture[0]
    ax.imshow(rgb, cmap=None if picture.shape[0] == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
    heat = colormaps["jet"](saliency)
    heat[..., 3] = 0.55 * saliency
    ax.imshow(heat, interpolation="bilinear")
    ax.set_title(title if saliency.max() > 0 else f"{title} (no positive evidence)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _missing(ax: Any, name: str, status: str, square: bool) -> None:
    if square:
        ax.set_box_aspect(1)
    colour = _COMPLETED_COLOUR if "completed" in status else _NOT_USED_COLOUR
    ax.set_facecolor("#f0f0f0")
    ax.text(
        0.5,
        0.5,
        f"{name}\n{status}",
        ha="center",
        va="center",
        fontsize=11,
        color=colour,
        wrap=True,
        transform=ax.transAxes,
        fontweight="bold",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def orthogonal_slices(picture: np.ndarray, saliency: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The three orthogonal slices through the map's maximum (the centre for an empty map): (label,
    picture [C, a, b], map [a, b]), superior up.

    Example:
        >>> [label for label, _, _ in orthogonal_slices(np.zeros((1, 8, 8, 4)), np.zeros((8, 8, 4)))]
        ['sagittal 4', 'coronal 4', 'axial 2']
    """
    peak = (
        np.unravel_index(int(np.argmax(saliency)), saliency.shape)
        if saliency.max() > 0
        else tuple(s // 2 for s in saliency.shape)
    )
    out = []
    for axis, label in enumerate(("sagittal", "coronal", "axial")):
        index: list[Any] = [slice(None)] * 3
        index[axis] = peak[axis]
        pic, sal = picture[(slice(None),) + tuple(index)], saliency[tuple(index)]
        # first remaining array axis runs left-right / posterior-anterior: show it horizontally, superior up
        out.append((f"{label} {peak[axis]}", np.flip(np.swapaxes(pic, -1, -2), -2), np.flip(sal.T, 0)))
    return out


def _image_panels(fig: Figure, grid: Any, explanation: CaseExplanation, mean: Any, std: Any) -> None:
    maps = explanation.maps
    if explanation.spatial_dims == 3:
        sub = grid.subgridspec(len(maps), 3, hspace=0.3, wspace=0.05)
        for r, m in enumerate(maps):
            if m.status != PRESENT:
                _missing(fig.add_subplot(sub[r, :]), m.name, m.status, False)
                continue
            assert m.image is not None and m.saliency is not None  # a present modality has both
            picture = _display(m.image, None, None)
            for c, (label, pic, sal) in enumerate(orthogonal_slices(picture, m.saliency)):
                _overlay(fig.add_subplot(sub[r, c]), pic, sal, f"{m.name} \u00b7 {label}")
        return
    cols = min(3, len(maps))
    rows = -(-len(maps) // cols)
    sub = grid.subgridspec(rows, cols, hspace=0.2, wspace=0.05)
    for i, m in enumerate(maps):
        ax = fig.add_subplot(sub[i // cols, i % cols])
        if m.status != PRESENT:
            _missing(ax, m.name, m.status, True)
        else:
            assert m.image is not None and m.saliency is not None  # a present modality has both
            _overlay(ax, _display(m.image, mean, std), m.saliency, m.name)


def _probability_panel(ax: Any, explanation: CaseExplanation) -> None:
    names = list(explanation.probabilities)
    values = [explanation.probabilities[n] for n in names]
    colours = ["#c0392b" if n == explanation.target else "#5d8aa8" for n in names]
    ax.barh(range(len(names)), values, color=colours)
    ax.set_yticks(range(len(names)), [n[:24] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    for y, v in enumerate(values):
        ax.text(min(v + 0.02, 0.8), y, f"{v:.2f}", va="center", fontsize=8)
    ax.set_title("class probabilities", fontsize=10)


def _inputs_text(explanation: CaseExplanation) -> str:
    lines = ["Inputs"]
    for m in explanation.maps:
        lines.append(f"  {m.name}: {'present' if m.status == PRESENT else m.status}")
    if explanation.table is not None:
        lines.append(f"  table: {'present' if explanation.table_status == PRESENT else explanation.table_status}")
        for column, value in explanation.table.items():
            lines.append(f"    {column}: {'(missing)' if is_empty_cell(value) else str(value)[:20]}")
    if explanation.completed:
        lines.append("Completed by the model: " + ", ".join(explanation.completed))
    return "\n".join(lines[:40])


def render_page(
    explanation: CaseExplanation, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """The case page as RGB pixels ``[H, W, 3]`` uint8 of :data:`PAGE_SIZE`.

    Args:
        explanation: from :class:`cmml_monai.evaluation.explain.Explainer`.
        mean, std: the 2D images' normalisation (the description's preprocessing), undone for display.

    Example:
        >>> render_page(explainer(image, tabular, "case-1")).shape  # doctest: +SKIP
        (1000, 1400, 3)
    """
    fig = Figure(figsize=(PAGE_SIZE[0] / _DPI, PAGE_SIZE[1] / _DPI), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(
        2,
        2,
        width_ratios=[2.8, 1.2],
        height_ratios=[1, 1.3],
        left=0.03,
        right=0.97,
        top=0.90,
        bottom=0.07,
        wspace=0.25,
        hspace=0.25,
    )
    p = explanation.probabilities[explanation.target]
    fig.text(
        0.03,
        0.955,
        f"Case {explanation.case_id[:40]}  \u00b7  most probable: {explanation.target} ({p:.2f})",
        fontsize=15,
        fontweight="bold",
    )
    fig.text(
        0.03,
        0.925,
        f"Maps: {explanation.method} for '{explanation.target}' on each image's encoder "
        "(red = strongest evidence for that class; relative within each image)",
        fontsize=9,
    )
    fig.text(0.97, 0.955, RESEARCH_USE_ONLY, fontsize=13, color="#c0392b", fontweight="bold", ha="right")
    _image_panels(fig, grid[:, 0], explanation, mean, std)
    _probability_panel(fig.add_subplot(grid[0, 1]), explanation)
    text_ax = fig.add_subplot(grid[1, 1])
    text_ax.axis("off")
    text_ax.text(
        0.0,
        1.0,
        _inputs_text(explanation),
        va="top",
        ha="left",
        fontsize=8,
        family="monospace",
        transform=text_ax.transAxes,
    )
    fig.text(
        0.5,
        0.02,
        RESEARCH_USE_ONLY + " \u00b7 maps show what the model used, not where disease is",
        fontsize=12,
        color="#c0392b",
        fontweight="bold",
        ha="center",
    )
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_page(
    explanation: CaseExplanation, path: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> np.ndarray:
    """Write the case page as a PNG (pixels only: no text chunk) and return its pixels.

    Example:
        >>> save_page(explanation, "predictions/cases/case-1.png").shape  # doctest: +SKIP
        (1000, 1400, 3)
    """
    pixels = render_page(explanation, mean, std)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG")
    return pixels


def read_page(path: str) -> np.ndarray:
    """A page's RGB pixels ``[H, W, 3]`` uint8.

    Example:
        >>> read_page("predictions/cases/case-1.png").shape  # doctest: +SKIP
        (1000, 1400, 3)
    """
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_index(entries: Sequence[Mapping[str, Any]], path: str, title: str = "Case pages") -> str:
    """An HTML page listing the cases of a run: each entry's ``case_id``, ``prediction``, ``present``,
    ``completed`` (lists or strings) and ``page`` (the PNG's path relative to ``path``'s folder); returns ``path``.

    Example:
        >>> write_index([{"case_id": "c1", "prediction": "nev", "present": ["derm"], "completed": [],
        ...               "page": "c1.png"}], "predictions/cases/index.html")  # doctest: +SKIP
    """

    def cell(value: Any) -> str:
        return html.escape(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))

    rows = "\n".join(
        f'<tr><td><a href="{html.escape(str(e["page"]))}">{cell(e["case_id"])}</a></td><td>{cell(e["prediction"])}'
        f"</td><td>{cell(e['present'])}</td><td>{cell(e['completed'])}</td></tr>"
        for e in entries
    )
    text = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head><body>\n'
        f"<h1>{html.escape(title)}</h1>\n<p><strong>{html.escape(RESEARCH_USE_ONLY)}</strong></p>\n"
        '<table border="1" cellpadding="4"><tr><th>case</th><th>prediction</th><th>present</th>'
        f"<th>completed by the model</th></tr>\n{rows}\n</table>\n</body></html>\n"
    )
    atomic_write_text(os.fspath(path), text)
    return os.fspath(path)
