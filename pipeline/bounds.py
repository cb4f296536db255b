"""What a decoder may allocate for one item from outside, checked before it allocates.

Every decoder of outside data (images, COCO and brush RLE masks, JSON lines, parquet cells,
texts, turn indices) checks the sizes its input *declares* against the limits below before it
allocates anything of that size, the way Pillow's `MAX_IMAGE_PIXELS` does for images: a few
bytes of input never decide how much memory a process takes. A value out of bounds raises
`OutOfBounds` (a `ValueError`) with a one-line reason a person understands; the caller turns it
into that item's `SourceError`, so the item is quarantined and the command goes on.

The limits, and why:

- `MAX_PIXELS` (64 M): pixels of an image a source decodes (the safe decoder's cap; shards are
  bounded the same way). Decoding an accepted image costs about 4-5 bytes per pixel on top of its
  RGB result (measured in `pipeline.sources.decode`, RGBA compositing included).
- A mask is never bigger than its image: a COCO RLE's `size` must equal the image's (h, w) where
  the caller knows it (parquet `masks`, COCO annotations of the folder source), else it holds at
  most `MAX_PIXELS` pixels (or the caller's smaller cap); its runs must sum to h * w and number at
  most h * w + 1 — all checked before the mask is allocated. A brush RLE (Label Studio) declares
  h * w * 4 values: it must match the sample it corrects before it is decoded.
- `MAX_JSON_LINE_BYTES` (1 MiB): one JSON/JSONL line (a turn record); longer lines are refused
  unparsed. Numbers must be finite (`NaN`, `Infinity`, `1e400` are refused) and integers are at
  most `MAX_JSON_INT_DIGITS` digits.
- `MAX_TURN` (256): a session's turn index, and its number of turns. A turn chain is checked
  without building anything as large as its largest index.
- `MAX_TEXT_CHARS` (4096): an instruction or caption; control characters are removed (tab, line
  breaks → one space), a longer text is refused. Labels are clipped to `MAX_LABEL_CHARS`.
- Tar: an extended header body (PAX, GNU long name) is at most `MAX_TAR_HEADER_BYTES` (64 KiB);
  a member is at most `MAX_CELL_BYTES` and never more than the bytes the file still has
  (`pipeline.dataset.tarscan`).
- Parquet: a row group whose declared uncompressed size over the columns read exceeds
  `MAX_ROW_GROUP_BYTES` (512 MiB) is refused before it is read; a row's region lists hold at most
  `MAX_REGIONS` entries; an encoded image cell at most `MAX_CELL_BYTES` (the file cap).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_PIXELS = 64_000_000
MAX_CELL_BYTES = 256 * 1024 * 1024  # an encoded image, in a cell as in a file
MAX_ROW_GROUP_BYTES = 512 * 1024 * 1024
MAX_REGIONS = 1000
MAX_JSON_LINE_BYTES = 1024 * 1024
MAX_JSON_INT_DIGITS = 18  # below 2**63: anything longer is not a count, an index or an id
MAX_TURN = 256
MAX_TEXT_CHARS = 4096
MAX_LABEL_CHARS = 200
MAX_TAR_HEADER_BYTES = 64 * 1024  # a PAX / GNU long-name body: paths and a few attributes
# Groups of 5 bits a COCO RLE count may use: 7 hold +-2**34, far beyond any h * w <= MAX_PIXELS,
# and keep the running sums of a decoded string inside int64.
MAX_RLE_GROUPS = 7


class OutOfBounds(ValueError):
    """A declared size or value beyond the documented limits: the reason is one line."""


def check_pixels(width: Any, height: Any, *, what: str = "image",
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as ints when both are positive and their product is within `max_pixels`."""
    w, h = integer(width, f"{what} width"), integer(height, f"{what} height")
    if w <= 0 or h <= 0:
        raise OutOfBounds(f"{what} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise OutOfBounds(f"{what} of {w}x{h} = {w * h:,} pixels is over the limit of "
                          f"{max_pixels:,}")
    return w, h


def check_mask_size(height: Any, width: Any, *, expected: tuple[int, int] | None = None,
                    max_pixels: int = MAX_PIXELS, what: str = "mask") -> tuple[int, int]:
    """(h, w) of a mask: equal to `expected` (the image's (h, w)) when known, else within
    `max_pixels`. A mask is never bigger than its image."""
    h, w = integer(height, f"{what} height"), integer(width, f"{what} width")
    if expected is not None and (h, w) != (int(expected[0]), int(expected[1])):
        raise OutOfBounds(f"{what} declares {w}x{h}, its image is {int(expected[1])}x"
                          f"{int(expected[0])}")
    if h < 0 or w < 0:
        raise OutOfBounds(f"{what} declares a negative size {w}x{h}")
    if h * w > max_pixels:
        raise OutOfBounds(f"{what} declares {w}x{h} = {w * h:,} pixels, over the limit of "
                          f"{max_pixels:,}")
    return h, w


def integer(value: Any, what: str) -> int:
    """An integral number (an int, or a float with no fraction), bounded to
    `MAX_JSON_INT_DIGITS` digits; booleans, strings, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:  # numpy scalars
            import numpy as np
            if isinstance(value, np.integer):
                value = int(value)
            elif isinstance(value, np.floating):
                value = float(value)
            else:
                raise TypeError
        except TypeError:
            raise OutOfBounds(f"{what} is not a number ({_kind(value)})") from None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise OutOfBounds(f"{what} is not an integer ({value!r})")
        value = int(value)
    if abs(value) >= 10 ** MAX_JSON_INT_DIGITS:
        raise OutOfBounds(f"{what} has more than {MAX_JSON_INT_DIGITS} digits")
    return value


def turn_index(value: Any) -> int:
    """A turn index within 1..MAX_TURN (an int, or a float with no fraction)."""
    try:
        turn = integer(value, "turn index")
    except OutOfBounds:
        raise OutOfBounds(f"turn index {clip_text(repr(value), 40)} is not an integer in "
                          f"1..{MAX_TURN}") from None
    if not 1 <= turn <= MAX_TURN:
        raise OutOfBounds(f"turn index {turn} is not within 1..{MAX_TURN}")
    return turn


def finite(value: Any, what: str, default: float | None = None) -> float:
    """A finite float (`default` when value is None)."""
    if value is None and default is not None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OutOfBounds(f"{what} is not a number ({_kind(value)})") from None
    if not math.isfinite(number):
        raise OutOfBounds(f"{what} is not a finite number ({number!r})")
    return number


def _refuse_constant(name: str) -> Any:
    raise OutOfBounds(f"{name} is not a finite number")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise OutOfBounds(f"an integer of {len(text.lstrip('-'))} digits (at most "
                          f"{MAX_JSON_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise OutOfBounds(f"{clip_text(text, 40)} is not a finite number")
    return value


def json_value(text: str | bytes, *, what: str = "JSON", max_bytes: int = MAX_JSON_LINE_BYTES,
               strict: bool = True) -> Any:
    """Parse one JSON document (a JSONL line) of at most `max_bytes`, with finite numbers and
    bounded integers only. OutOfBounds (a ValueError) for anything else, with a one-line reason.
    `strict=False` keeps out-of-bounds numbers (`Infinity`, `1e400`, long integers) for the caller
    to refuse the item they belong to (`turn_index`, `integer`, `finite`) rather than the line."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise OutOfBounds(f"{what} is {size:,} bytes, over the limit of {max_bytes:,}")
    hooks: dict[str, Any] = {}
    if strict:
        hooks = {"parse_constant": _refuse_constant, "parse_int": _parse_int,
                 "parse_float": _parse_float}
    try:
        return json.loads(text, **hooks)
    except OutOfBounds as exc:
        raise OutOfBounds(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digits limit
        raise OutOfBounds(clip_text(f"{what} is not JSON: {exc}", 200)) from None


# Control characters (C0, DEL, C1) and the Unicode line/paragraph separators; tab and line breaks
# become a space, the rest is removed.
_SPACES = re.compile(r"[\t\n\r\x0b\x0c\x85\u2028\u2029]+")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")


def _clean(text: str) -> str:
    return _CONTROLS.sub("", _SPACES.sub(" ", text)).strip()


def clean_text(value: Any, *, what: str = "text", max_chars: int = MAX_TEXT_CHARS) -> str:
    """A text from outside, control characters removed (tab and line breaks → one space, none
    at either end), refused (OutOfBounds) when longer than `max_chars` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > 4 * max_chars:  # refused before any work proportional to its size
        raise OutOfBounds(f"{what} is {len(text):,} characters, over the limit of {max_chars:,}")
    text = _clean(text)
    if len(text) > max_chars:
        raise OutOfBounds(f"{what} is {len(text):,} characters, over the limit of {max_chars:,}")
    return text


def clip_text(value: Any, max_chars: int = MAX_LABEL_CHARS) -> str:
    """A text from outside for a label, a context or a reason: control characters removed, cut to
    `max_chars` characters (with "…")."""
    text = value if isinstance(value, str) else str(value)
    text = _clean(text[: 4 * max_chars])
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def check_row_group(metadata: Any, group: int, columns: list[str] | None, what: str) -> None:
    """OutOfBounds when row group `group` of a parquet file (its `FileMetaData`) declares more
    than `MAX_ROW_GROUP_BYTES` uncompressed over `columns` (all when None): refused before the
    group is read, whatever its compressed size on disk."""
    rg = metadata.row_group(group)
    wanted = None if columns is None else set(columns)
    declared = 0
    for i in range(rg.num_columns):
        chunk = rg.column(i)
        if wanted is None or chunk.path_in_schema.split(".")[0] in wanted:
            declared += int(chunk.total_uncompressed_size)
    if declared > MAX_ROW_GROUP_BYTES:
        raise OutOfBounds(f"{what}: row group {group} declares {declared:,} bytes uncompressed, "
                          f"over the limit of {MAX_ROW_GROUP_BYTES:,} (write the file with "
                          f"smaller row groups)")


def check_count(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise OutOfBounds(f"{what}: {n:,}, over the limit of {limit:,}")


def _kind(value: Any) -> str:
    return type(value).__name__
