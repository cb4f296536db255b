"""OUT/contact_sheet.jpg and OUT/contact_sheet_others.jpg: a build's pairs, one image to look through.

A person decides whether a build's pairs are worth training on by looking at them, not at scores:
`contact_sheet.jpg` shows every accepted pair as source | target side by side with its instruction
wrapped under it; `contact_sheet_others.jpg` does the same for the borderline and rejected pairs,
with the verdict and the first routing check each failed. Readable at normal zoom (two pairs per
row, each image ≤ 240 px, 14 px text). A big build's sheet shows the first `MAX_TILES` pairs by
index and says so in its title.

Written by `pipeline.dataset.report.write_report` from the same manifest and shards as the report,
so whatever re-makes the report (the build's finalize step, `mcie review pull`) re-makes the
sheets too.
"""

from __future__ import annotations

import io
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage
from pipeline.dataset.output import read_manifest
from pipeline.dataset.shards import atomic_write_bytes

log = logging.getLogger(__name__)

ACCEPTED, OTHERS = "contact_sheet.jpg", "contact_sheet_others.jpg"
SHEETS = ((ACCEPTED, "accepted pairs"), (OTHERS, "borderline and rejected pairs"))
IMAGE_PX = 240  # each image's longer side in a tile
COLUMNS = 2
MAX_TILES = 60  # per sheet: a 300-pair build stays an image a browser shows at once
FONT_PX = 14
PAD = 10
BG, INK, GREY, RED = (255, 255, 255), (20, 20, 20), (110, 110, 110), (170, 30, 30)
VERDICT_INK = {"accept": (30, 130, 60), "reject": RED, "borderline": (170, 120, 0)}


@dataclass
class Tile:
    """One pair on a sheet: its two images and the lines under them."""
    header: str
    source: np.ndarray
    target: np.ndarray
    text: str
    note: str = ""  # red, under the text (why it was not accepted)
    header_ink: tuple[int, int, int] = GREY


@dataclass
class Sheet:
    image: Image.Image
    source_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # where each source sits


def _font(size: int = FONT_PX) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans where the system has it (it has every glyph an instruction may use), else
    Pillow's bundled font (nothing to install)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Word-wrap `text` to `width` px (measured in `font`), at most `max_lines` lines."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.extend(textwrap.wrap(word, max(8, width // 8)) or [""])  # a very long word is cut
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines


def _fit(image: np.ndarray) -> Image.Image:
    picture = Image.fromarray(image)
    picture.thumbnail((IMAGE_PX, IMAGE_PX), Image.Resampling.LANCZOS)
    return picture


def render_sheet(title: str, tiles: list[Tile]) -> Sheet:
    """Tiles in rows of COLUMNS, each row as tall as its tallest tile, under a title line."""
    font, small = _font(), _font(FONT_PX - 2)
    line = FONT_PX + 5
    tile_w = 2 * IMAGE_PX + 3 * PAD
    text_w = tile_w - 2 * PAD
    laid = []
    for tile in tiles:
        pictures = [_fit(tile.source), _fit(tile.target)]
        text = _wrap(tile.text, font, text_w, 6)
        note = _wrap(tile.note, small, text_w, 3) if tile.note else []
        image_h = max(p.height for p in pictures)  # the text sits right under a landscape pair
        laid.append((tile, pictures, image_h, text, note,
                     line + image_h + PAD + line * (len(text) + len(note)) + PAD))
    rows = [laid[i:i + COLUMNS] for i in range(0, len(laid), COLUMNS)]
    title_h = 2 * PAD + line
    width = COLUMNS * tile_w + (COLUMNS + 1) * PAD
    height = title_h + sum(max(t[-1] for t in row) + PAD for row in rows) + PAD
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill=INK, font=_font(FONT_PX + 2))
    boxes = []
    y = title_h
    for row in rows:
        row_h = max(t[-1] for t in row)
        for column, (tile, pictures, image_h, text, note, _) in enumerate(row):
            x = PAD + column * (tile_w + PAD)
            draw.rectangle((x, y, x + tile_w - 1, y + row_h - 1), outline=(210, 210, 210))
            draw.text((x + PAD, y + 4), tile.header, fill=tile.header_ink, font=small)
            top = y + line
            for k, picture in enumerate(pictures):
                left = x + PAD + k * (IMAGE_PX + PAD)
                canvas.paste(picture, (left, top))
                if k == 0:
                    boxes.append((left, top, left + picture.width, top + picture.height))
            ty = top + image_h + PAD
            for text_line in text:
                draw.text((x + PAD, ty), text_line, fill=INK, font=font)
                ty += line
            for note_line in note:
                draw.text((x + PAD, ty), note_line, fill=RED, font=small)
                ty += line
        y += row_h + PAD
    return Sheet(canvas, boxes)


def _tiles(out: Path, rows: list[dict[str, Any]], with_reason: bool) -> list[Tile]:
    from pipeline.dataset.report import failed_checks, load_samples, read_config, routing_policy, score_text

    policy = routing_policy(read_config(out))
    samples = load_samples(out, rows)
    tiles = []
    for row in rows:
        sample = samples.get(row["id"])
        if sample is None or sample.source is None or sample.target is None:
            continue  # unreadable: load_samples has logged why
        overall = sample.scores.get("overall", row["score_overall"])
        header = f"#{row['index']} · {row['id']} · {row['verdict']} · overall {score_text(overall)}"
        checks = failed_checks(row, sample, policy) if with_reason else []
        tiles.append(Tile(header, sample.source, sample.target, row["instruction"] or "",
                          note=checks[0] if checks else "",
                          header_ink=VERDICT_INK.get(row["verdict"], GREY)))
    return tiles


def _sheet_bytes(out: Path, rows: list[dict[str, Any]], what: str, with_reason: bool) -> tuple[bytes, int]:
    chosen = sorted(rows, key=lambda r: r["index"])[:MAX_TILES]
    tiles = _tiles(out, chosen, with_reason)
    shown = f"all {len(rows)}" if len(tiles) == len(rows) else f"{len(tiles)} of {len(rows)}, first by index"
    # no path in the title: the same build in another folder gives the same bytes
    title = (f"{what.capitalize()} ({shown}): source | target, the instruction under each" if rows
             else f"No {what} in this build")
    buffer = io.BytesIO()
    render_sheet(title, tiles).image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), len(tiles)


def write_contact_sheets(out: Path) -> dict[str, int]:
    """Write both sheets into OUT (atomically; one PUT each on an object store); returns each
    sheet's name → pairs shown."""
    out = storage.location(out)
    rows = [r for r in read_manifest(out).to_pylist() if r["shard"]]
    accepted = [r for r in rows if r["verdict"] == "accept"]
    others = [r for r in rows if r["verdict"] in ("borderline", "reject")]
    shown = {}
    for name, group, what, with_reason in ((ACCEPTED, accepted, "accepted pairs", False),
                                           (OTHERS, others, "borderline and rejected pairs", True)):
        data, shown[name] = _sheet_bytes(out, group, what, with_reason)
        atomic_write_bytes(out / name, data)
    log.info("contact sheets written to %s: %s", out, shown)
    return shown
