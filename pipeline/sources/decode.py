"""The one safe decoder: bytes from any source → RGB uint8, or a one-line `SourceError`.

Every file source reads an item's bytes and hands them to `decode_image`; nothing else in the
factory opens an image from outside. What it guarantees:

- only the formats a photo source holds are parsed (JPEG/MPO, PNG, WebP, BMP, TIFF, GIF): no
  Ghostscript-backed EPS, no exotic plugin reached through a misnamed file;
- a decompression bomb is refused from the header, before any pixel is decoded (`max_pixels`,
  and Pillow's own bomb error/warning are turned into the same refusal);
- an RGBA image costs about 7.5 bytes a pixel to decode (alpha composited in uint8 bands,
  measured in `_on_white`; 16-bit grey is scaled in integers too; 32-bit integer and float grey
  still go through float64), and a process decodes at most `DECODE_BUDGET_PIXELS` pixels at once
  over its threads;
- truncated data is refused, never padded with grey (`ImageFile.LOAD_TRUNCATED_IMAGES` is left
  False);
- EXIF orientation is applied; CMYK, 16-bit/32-bit/float grey, palette, grey, alpha (composited
  on white) and animated images (first frame) come out RGB, and each normalisation is noted;
- whatever Pillow raises on hostile data becomes a `SourceError` with a one-line reason.

`check_shape` and the `Frame` (`pipeline.sources.frame`: a uniform scale to the resolution and a
centre crop to the size grid, never a stretch) are the two steps every source applies after
decoding, and `to_item` runs the three in order; the same frame carries regions a source knows
(COCO annotations, parquet box/mask columns) from the original pixels to the sample's.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from pipeline import bounds
from pipeline.storage import fs_path, is_local, show
from pipeline.sources.base import SourceError, SourceItem
from pipeline.sources.frame import Frame

MAX_PIXELS = bounds.MAX_PIXELS  # the decoder's cap, documented in `pipeline.bounds`
MAX_FILE_BYTES = 256 * 1024 * 1024  # a photo file larger than this is refused unread
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib",
                            ".tif", ".tiff", ".gif"})
REASON_MAX_CHARS = 200

# Everything Pillow and its codecs are known to raise on hostile input (a flipped bit gives
# SyntaxError from a PNG chunk parser, struct.error from a short header, zlib.error from an IDAT
# stream, DecompressionBombError from a forged size, ...). Every image reader catches these.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, struct.error, zlib.error, EOFError,
                 TypeError, IndexError, KeyError, AttributeError, MemoryError, OverflowError,
                 ZeroDivisionError, RuntimeError, NotImplementedError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    image: np.ndarray  # uint8 HxWx3 RGB, EXIF orientation applied
    notes: list[str] = field(default_factory=list)  # what normalisation it needed
    original_size: tuple[int, int] = (0, 0)  # (w, h) as decoded, after EXIF orientation


def one_line(text: str) -> str:
    """A reason fit for a manifest row: one line, capped."""
    line = " ".join(str(text).split())
    return line if len(line) <= REASON_MAX_CHARS else line[: REASON_MAX_CHARS - 1] + "…"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb refused: {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image: unrecognised format or corrupt header"
    if isinstance(exc, MemoryError):
        return "image too large to decode (out of memory)"
    text = str(exc) or type(exc).__name__
    if "truncated" in text:
        return f"truncated image: {text}"
    return f"corrupt image ({type(exc).__name__}: {text})"


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS,
                 formats: Sequence[str] = FORMATS) -> DecodedImage:
    """Decode `data` to RGB uint8 HxWx3, or raise `SourceError` with a one-line reason.
    Thread-safe: sources are read from a thread pool (decoding releases the GIL)."""
    if not data:
        raise SourceError("empty file (0 bytes)")
    try:
        with _open(data, tuple(formats)) as im:
            return _decode(im, max_pixels)
    except SourceError:
        raise
    except DECODE_ERRORS as exc:
        raise SourceError(one_line(_reason(exc))) from None


_HEADER_LOCK = threading.Lock()

# Pixels a process decodes at once, over all its threads (the build fingerprints and reads keys
# from thread pools): a decode waits until its pixels fit, so four images at the cap cost two at a
# time (about 1 GB, at the 7.5 bytes a pixel `_on_white` measures), not four. One image alone
# always fits.
DECODE_BUDGET_PIXELS = 2 * MAX_PIXELS
_BUDGET = threading.Condition()
_in_flight = 0


@contextmanager
def _pixel_budget(pixels: int) -> Iterator[None]:
    global _in_flight
    need = min(int(pixels), DECODE_BUDGET_PIXELS)
    with _BUDGET:
        _BUDGET.wait_for(lambda: _in_flight + need <= DECODE_BUDGET_PIXELS)
        _in_flight += need
    try:
        yield
    finally:
        with _BUDGET:
            _in_flight -= need
            _BUDGET.notify_all()


def _open(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """Parse the header only. Pillow warns (from 89 M pixels, an error from twice that) when
    the header declares a huge image; that warning must refuse the image, not scroll past.
    Warning filters are process-wide, so the (short, pixel-free) header parse holds a lock
    while they are changed; decoding the pixels happens outside it."""
    Image.init()  # registers every plugin once, so a format named in `formats` is known
    known = tuple(f for f in formats if f in Image.OPEN)
    with _HEADER_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=known)


def _decode(im: Image.Image, max_pixels: int) -> DecodedImage:
    """Size check from the header, then the first frame's pixels, oriented and made RGB."""
    w, h = im.size  # from the header: nothing decoded yet
    if w <= 0 or h <= 0:
        raise SourceError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise SourceError(f"decompression bomb refused: {w}x{h} = {w * h:,} pixels "
                          f"over the limit of {max_pixels:,}")
    notes: list[str] = []
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        im.seek(0)
        notes.append(f"first frame of {frames}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone set it globally: refuse to pad silently
        raise SourceError("refusing to decode: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set")
    with _pixel_budget(w * h):
        return _decode_pixels(im, w, h, max_pixels, notes)


def _decode_pixels(im: Image.Image, w: int, h: int, max_pixels: int,
                   notes: list[str]) -> DecodedImage:
    im.load()
    if im.size != (w, h) and im.size[0] * im.size[1] > max_pixels:  # a frame larger than said
        raise SourceError(f"decompression bomb refused: a frame of {im.size[0]}x{im.size[1]} "
                          "pixels")
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except DECODE_ERRORS:
        orientation = 1
        notes.append("exif unreadable, orientation not applied")
    oriented = im
    if 2 <= orientation <= 8:
        oriented = ImageOps.exif_transpose(im)
        notes.append("exif-rotated")
    array = _to_rgb(oriented, notes)
    if oriented is not im:
        oriented.close()
    im.close()  # Pillow's pixels go before the budget is given back
    return DecodedImage(image=array, notes=notes, original_size=(array.shape[1], array.shape[0]))


def _to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_8bit(np.asarray(im), mode)
        notes.append("16-bit scaled" if mode.startswith("I;16") else f"{mode}-mode scaled to 8 bit")
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "CMYK":
        notes.append("cmyk converted")
        im = im.convert("RGB")
    elif mode in ("P", "PA"):
        notes.append("palette")
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("1", "L"):
        notes.append("grey")
        im = im.convert("RGB")
    elif mode in ("LA", "La"):
        notes.append("grey")
        im = im.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "RGBa"):
        notes.append(f"{mode} converted")
        im = im.convert("RGB")
    if im.mode in ("RGBA", "RGBa"):
        notes.append("alpha composited on white")
        return _on_white(im)
    array = np.asarray(im, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise SourceError(f"cannot normalise mode {mode} to RGB (got shape {array.shape})")
    return np.ascontiguousarray(array)


# Rows composited at once: a band's temporaries (its RGBA copy, uint16 products) stay a few MB
# whatever the image's size.
COMPOSITE_BAND_PIXELS = 1 << 20


def _on_white(im: Image.Image) -> np.ndarray:
    """An RGBA (or premultiplied RGBa) image composited on white → uint8 HxWx3, in bands of
    rows with integer arithmetic: round((rgb * a + 255 * (255 - a)) / 255), exactly the float
    formula's result, never above 255 * 255 + 127 so it fits uint16.

    Measured (a child process's ru_maxrss, an 8000x8000 = 64 M px RGBA PNG of 265 KB, the cap):
    the whole decode peaks at 7.5 bytes per pixel above the interpreter (515 MB in all) —
    Pillow's RGBA image (4) + the RGB result (3) + one band — where the float32 copy of the whole
    image it replaces peaked at 60 bytes per pixel (3.7 GB). tests/test_bounds_decoders.py holds
    it under a ceiling."""
    w, h = im.size
    out = np.empty((h, w, 3), dtype=np.uint8)
    rows = max(1, COMPOSITE_BAND_PIXELS // max(1, w))
    for top in range(0, h, rows):
        band = im.crop((0, top, w, min(h, top + rows)))
        if band.mode != "RGBA":
            band = band.convert("RGBA")
        rgba = np.asarray(band)
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        mixed = rgba[:, :, :3] * alpha  # uint16: at most 255 * 255
        mixed += 255 * (255 - alpha)
        mixed += 127
        out[top:top + rgba.shape[0]] = mixed // 255
    return out


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey is scaled by its full range (65535 → 255), never clipped; 32-bit integer and
    float images by the range their values use."""
    if mode.startswith("I;16"):  # rint(v / 257) in integers (no ties: 257 is odd), no float copy
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    v = values.astype(np.float64)
    if mode == "F" and np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0:
        out = v * 255.0
    else:
        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0 and hi <= 255 and mode == "I":
            out = v
        elif lo >= 0 and hi <= 65535:
            out = v / 257.0
        else:
            out = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_options(resolution: int, min_side: int, max_aspect: float) -> None:
    """ValueError for options no file source can work with (every file source calls it)."""
    if int(resolution) < 64:
        raise ValueError(f"resolution must be at least 64 px, got {resolution}")
    if int(min_side) < 1:
        raise ValueError(f"min_side must be at least 1, got {min_side}")
    if float(max_aspect) < 1.0:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")


def check_shape(width: int, height: int, min_side: int, max_aspect: float) -> None:
    """SourceError when the image is too small or too elongated to edit."""
    if min(width, height) < min_side:
        raise SourceError(f"image is {width}x{height} px, under --min-side {min_side}")
    aspect = max(width, height) / max(1, min(width, height))
    if aspect > max_aspect:
        raise SourceError(f"aspect {aspect:.1f} beyond --max-aspect {max_aspect:g}")


def read_bytes(path: Any, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes; SourceError for a missing file, a FIFO/device/directory or a file
    over `max_bytes` (checked on the open descriptor, before reading). `path` may be an object
    store location (`pipeline.storage.location`): one ranged GET of at most `max_bytes` + 1."""
    if not is_local(path):
        return _read_object(path, max_bytes)
    with _read_errors(path, "file"):
        # O_NONBLOCK: opening a FIFO must not hang the worker (no effect on regular files).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SourceError("not a regular file")
            if st.st_size > max_bytes:
                raise SourceError(f"file is {st.st_size:,} bytes, over the limit of {max_bytes:,}")
            return f.read(max_bytes + 1)


@contextmanager
def _read_errors(path: Any, what: str) -> Iterator[None]:
    """OSErrors of a read, as one-line SourceErrors (a file and an object alike)."""
    try:
        yield
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"file not found: {one_line(show(path))}") from None
    except IsADirectoryError:
        raise SourceError("not a regular file (a directory)") from None
    except OSError as exc:
        raise SourceError(one_line(f"cannot read {what} ({exc.strerror or exc})")) from None


def is_regular(path: Any) -> bool:
    """True for a regular file (after following symlinks): a FIFO is never opened. An object
    store location is regular when it is an object (not a prefix)."""
    if not is_local(path):
        try:
            return bool(path.is_file())
        except OSError:
            return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_object(path: Any, max_bytes: int) -> bytes:
    """An object's bytes in one ranged GET: a byte more than the cap says it is over it, without
    a HEAD first and without reading the rest."""
    fs, name = fs_path(path)
    with _read_errors(path, "object"):
        data = fs.cat_file(name, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise SourceError(f"file is over the limit of {max_bytes:,} bytes")
    return bytes(data)


def to_item(data: bytes, *, resolution: int, min_side: int, max_aspect: float,
            meta: dict[str, Any] | None = None, max_pixels: int = MAX_PIXELS) -> SourceItem:
    """decode → check_shape → the frame at `resolution`, with `decode_notes`, `original_size`
    and `crop` (the window of the file the sample shows, in its pixels) in meta."""
    decoded = decode_image(data, max_pixels=max_pixels)
    w, h = decoded.original_size
    check_shape(w, h, min_side, max_aspect)
    frame = Frame.fit(w, h, resolution)
    item_meta = dict(meta or {})
    item_meta["decode_notes"] = list(decoded.notes)
    item_meta.update(frame.meta())
    return SourceItem(image=frame.image(decoded.image), meta=item_meta)


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] of the mask's true pixels (exclusive), None when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
