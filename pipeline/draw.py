"""The picture `plora inspect --png` writes: a row's masks in both modes and its (branch, time) grid.

Every number drawn comes from the facts dict of :mod:`pipeline.inspect`, which is also what
``--json`` prints, and the PNG carries that dict in its ``plora-facts`` text chunk.
matplotlib is imported here only, when a picture is asked for, and only through its
object API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from parallel import atomic
from parallel.errors import PloraError, missing_extra
from parallel.layout import MASK_MODES
from pipeline.inspect import RowView, human_bytes, visibility

PNG_FACTS_KEY = "plora-facts"

TRUNK_COLOUR = "#3a3a3a"
HIDDEN_COLOUR = "#ffffff"
MODE_RULES = {
    "isolated": "sees its own branch and the trunk, time(k) ≤ time(q)",
    "columnar": "sees every branch's earlier columns, time(k) < time(q), and itself",
}
# Sizes in inches for the grid's token text (8 pt): a character's width, a line's height.
CHAR_WIDTH_IN = 0.068
LINE_HEIGHT_IN = 0.14
MAX_GRID_WIDTH_IN = 30.0
MAX_MASK_PIXELS = 1200  # per side: about what a mask panel shows at 100 dpi


def sequence_colours(sequences: Sequence[Mapping[str, Any]]) -> list[str]:
    """One colour per sequence: dark grey for the trunk, hues for branches (tab10, then tab20's
    light tints, cycling), never a grey, so that the trunk stays distinct."""
    from matplotlib import colormaps  # noqa: PLC0415 - the 'viz' extra, only when drawing
    from matplotlib.colors import to_hex  # noqa: PLC0415

    greys = {7, 14, 15}  # tab10's grey and tab20's two greys
    hues = [to_hex(colormaps["tab10"](i)) for i in range(10) if i not in greys]
    hues += [to_hex(colormaps["tab20"](i)) for i in range(1, 20, 2) if i not in greys]
    first_branch = 1 if sequences and sequences[0]["role"] == "trunk" else 0
    return [TRUNK_COLOUR] * first_branch + [hues[i % len(hues)] for i in range(len(sequences) - first_branch)]


def sequence_label(seq: Mapping[str, Any]) -> str:
    return "trunk" if seq["role"] == "trunk" else f"branch {seq['branch_id']}"


def check_png_target(path: str | Path) -> None:
    """Fail before any work when the picture could not be written there: a name that promises
    another format, or a directory that neither exists nor can be made (missing ones are made)."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - the optional 'viz' extra, checked before any work
    except ImportError:
        raise missing_extra("--png", "viz") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PloraError(f"cannot write PNG {path}: the picture is a PNG; give a name ending in .png")
    existing = next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise PloraError(f"cannot write PNG {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise PloraError(f"cannot write PNG {path}: directory {existing} is not writable")


def write_row_png(
    path: str | Path,
    facts: Mapping[str, Any],
    view: RowView,
    tokens: Sequence[str],
    *,
    title: str,
) -> Path:
    """Draw the row of ``facts["row"]`` and write it as a PNG, atomically. Returns the path."""
    fig = row_figure(facts, view, tokens, title=title)
    return save_png(fig, path, metadata={PNG_FACTS_KEY: json.dumps(facts["row"])})


def save_png(fig: Any, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a matplotlib figure as a PNG, atomically, making missing directories; one line if the
    system refuses."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.open_atomic(path, "wb") as out:
            fig.savefig(out, format="png", dpi=100, metadata=dict(metadata or {}))
    except OSError as err:
        raise PloraError(f"cannot write PNG {path}: {err.strerror or err}") from None
    return path


def row_figure(
    facts: Mapping[str, Any],
    view: RowView,
    tokens: Sequence[str],
    *,
    title: str,
) -> Any:
    """A matplotlib Figure: both masks side by side on top, the (branch, time) grid below."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - the 'viz' extra, only when drawing
    from matplotlib.patches import Patch  # noqa: PLC0415

    row = facts["row"]
    sequences = row["sequences"]
    colours = sequence_colours(sequences)
    span = max(row["time_span"], 1)
    width = float(np.clip(0.3 * span + 2.5, 14.0, MAX_GRID_WIDTH_IN))
    cells = _cell_text_layout(width, span)
    grid_height = cells.row_height * len(sequences) + 1.6
    masks_height = float(np.clip(0.4 * width, 7.0, 11.0))  # square masks filling their half of the width
    fig = Figure(figsize=(width, masks_height + 0.2 + grid_height), layout="constrained")
    spec = fig.add_gridspec(2, 2, height_ratios=[masks_height, grid_height])
    fig.suptitle(title + "\n" + _row_summary(row), fontsize=13)

    for col, mode in enumerate(MASK_MODES):
        ax = fig.add_subplot(spec[0, col])
        _draw_mask(ax, mode, row, view, colours)
    legend = [Patch(facecolor=c, label=sequence_label(s)) for s, c in zip(sequences, colours, strict=True)]
    legend.append(Patch(facecolor=HIDDEN_COLOUR, edgecolor="#999999", label="not visible"))
    ax.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        title="key k's sequence",
        fontsize=9,
        ncols=1 + len(legend) // 24,
    )

    _draw_grid(fig.add_subplot(spec[1, :]), row, view, tokens, colours, cells)
    return fig


def _row_summary(row: Mapping[str, Any]) -> str:
    trunk = f"trunk of {row['trunk_len']} tokens + " if row["has_trunk"] else "no trunk, "
    dense = row["masks"][MASK_MODES[0]]
    return (
        f"{trunk}{row['num_branches']} branches, {row['tokens']:,} tokens "
        f"({row['trained_tokens']:,} trained), {row['time_span']} time steps; "
        f"a dense [L, L] mask costs {human_bytes(dense['dense_float32_bytes'])} as float32, "
        f"{human_bytes(dense['dense_bool_bytes'])} as bool"
    )


def _block_edges(view: RowView) -> tuple[np.ndarray, np.ndarray]:
    """Start index of each sequence in the sorted row, and the end of the last one."""
    starts = np.flatnonzero(np.r_[True, view.branch_id[1:] != view.branch_id[:-1]])
    return starts, np.r_[starts[1:], view.num_tokens]


def _draw_mask(
    ax: Any,
    mode: str,
    row: Mapping[str, Any],
    view: RowView,
    colours: Sequence[str],
) -> None:
    from matplotlib.colors import to_rgba_array  # noqa: PLC0415 - the 'viz' extra, only when drawing

    # Colour a visible (q, k) by k's sequence, as RGBA bytes. A long row is sampled down to about
    # the panel's pixels: its full [L, L] mask, let alone a float image of it, would take gigabytes.
    n = view.num_tokens
    picked = np.unique(np.linspace(0, n - 1, min(n, MAX_MASK_PIXELS)).round().astype(np.int64))
    mask = visibility(view, mode, queries=picked, keys=picked)
    palette = (255 * to_rgba_array([HIDDEN_COLOUR, *colours])).round().astype(np.uint8)
    sequence_index = np.searchsorted(np.unique(view.branch_id), view.branch_id)[picked]
    image = palette[np.where(mask, sequence_index[None, :] + 1, 0)]
    ax.imshow(image, interpolation="nearest", extent=(0, n, n, 0))
    starts, ends = _block_edges(view)
    for edge in starts[1:]:
        ax.axhline(edge, color="#bbbbbb", linewidth=0.6)
        ax.axvline(edge, color="#bbbbbb", linewidth=0.6)
    centres = (starts + ends) / 2
    labels = ["trunk" if s["role"] == "trunk" else f"b{s['branch_id']}" for s in row["sequences"]]
    step = max(1, len(labels) // 16)  # keep tick labels legible for many branches
    ax.set_xticks(centres[::step], labels[::step], fontsize=8)
    ax.set_yticks(centres[::step], labels[::step], fontsize=8)
    ax.set_xlabel("key token k (row sorted by branch, then time)")
    ax.set_ylabel("query token q")
    m = row["masks"][mode]
    ax.set_title(
        f"{mode} mask: q {MODE_RULES[mode]}\n"
        f"{m['visible_pairs']:,} visible pairs of {row['tokens'] ** 2:,} (density {m['density']:.1%}; "
        f"causal would be {m['causal_pairs']:,})",
        fontsize=10,
    )


def _draw_grid(
    ax: Any,
    row: Mapping[str, Any],
    view: RowView,
    tokens: Sequence[str],
    colours: Sequence[str],
    cells: _CellText,
) -> None:
    from matplotlib.colors import to_rgb  # noqa: PLC0415 - the 'viz' extra, only when drawing

    sequences = row["sequences"]
    span = max(row["time_span"], 1)
    ys = np.searchsorted(np.unique(view.branch_id), view.branch_id)
    # Cell colour: the sequence's colour for trained targets, a pale tint of it for context.
    rgb = np.ones((len(sequences), span, 3))
    for i, (y, t) in enumerate(zip(ys, view.time_id, strict=True)):
        base = np.array(to_rgb(colours[y]))
        rgb[y, t] = base if view.target[i] else 0.3 * base + 0.7
    extent = (-0.5, span - 0.5, len(sequences) - 0.5, -0.5)
    ax.imshow(rgb, interpolation="nearest", aspect="auto", extent=extent)
    ax.set_yticks(range(len(sequences)), [_grid_label(s) for s in sequences], fontsize=8)
    ax.set_xlabel("time_id")
    ax.set_ylabel("sequence (branch_id)")
    if cells.chars:  # cell borders only where cells are big enough to read one by one
        ax.set_xticks(np.arange(-0.5, span, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, len(sequences), 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)

    what = "token ids" if sequences[0]["text"] is None else "token text"
    shown = what if cells.chars else f"no {what}: too many time steps to fit"
    ax.set_title(
        f"(branch, time) grid, one cell per token: full colour = training target "
        f"(predicted from the previous token of its sequence), pale = not trained; {shown}",
        fontsize=10,
    )
    if not cells.chars:
        return
    renderable = _renderable_chars()
    for i, (y, t) in enumerate(zip(ys, view.time_id, strict=True)):
        text = _cell_text(tokens[i], int(view.input_ids[i]), cells.chars, renderable)
        colour = "white" if view.target[i] else "#222222"
        ax.text(t, y, text, ha="center", va="center", fontsize=8, color=colour, rotation=cells.rotation)


@dataclass(frozen=True)
class _CellText:
    chars: int  # characters of token text a cell holds; 0 = none
    rotation: int  # degrees
    row_height: float  # inches per grid row


def _cell_text_layout(fig_width: float, span: int) -> _CellText:
    """Horizontal text where cells are wide enough for a short word, else vertical text in taller
    rows, else (hundreds of time steps) colours only."""
    cell_width = 0.8 * fig_width / span
    if cell_width >= 6 * CHAR_WIDTH_IN:
        return _CellText(int(cell_width / CHAR_WIDTH_IN), 0, 0.45)
    if cell_width >= LINE_HEIGHT_IN:
        row_height = 0.9
        return _CellText(int(0.85 * row_height / CHAR_WIDTH_IN), 90, row_height)
    return _CellText(0, 0, 0.45)


def _grid_label(seq: Mapping[str, Any]) -> str:
    return f"{sequence_label(seq)} (t {seq['time_start']}-{seq['time_end']})"


def _cell_text(token: str, token_id: int, chars: int, renderable: frozenset[int]) -> str:
    """A token's text made visible in a small cell: whitespace as symbols, ids for glyphs the
    font lacks, cut to the cell's width."""
    text = token.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
    if not text or any(ord(c) not in renderable for c in text):
        text = f"#{token_id}"
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "…"


@lru_cache(maxsize=1)
def _renderable_chars() -> frozenset[int]:
    import matplotlib  # noqa: PLC0415 - the 'viz' extra, only when drawing
    from matplotlib import font_manager  # noqa: PLC0415
    from matplotlib.ft2font import FT2Font  # noqa: PLC0415

    font = FT2Font(font_manager.findfont(matplotlib.rcParams["font.sans-serif"][0]))
    return frozenset(font.get_charmap())
