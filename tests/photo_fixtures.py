"""Real photographs for tests, and a hostile folder built from them.

The photos are the sample images shipped inside the scikit-image wheel, located at run time
(nothing is downloaded). `hostile_folder` writes every kind of file a real photo folder holds
sooner or later (truncated, empty, a bomb, CMYK, 16-bit, EXIF-rotated, animated, palette, RGBA,
a text file, a 1-px image, an extreme panorama, a symlink out of the folder) and says what a
build must do with each.
"""

from __future__ import annotations

import importlib.resources
import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs in scikit-image's package data (camera.png is grey, kept for grey tests).
PHOTO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
               "camera.png")
DEFAULT_FOLDER = ("astronaut", "chelsea", "coffee", "rocket")


def skimage_photos() -> dict[str, Path]:
    """{stem: path} of the photographs shipped in the installed scikit-image wheel."""
    data = importlib.resources.files("skimage") / "data"
    photos = {}
    for name in PHOTO_FILES:
        path = Path(str(data / name))
        if path.is_file():
            photos[path.stem] = path
    if not photos:
        raise FileNotFoundError(f"no sample photos found in {data} (is scikit-image installed?)")
    return photos


def photo_folder(dir: Path, names: list[str] | tuple[str, ...] | None = None) -> Path:
    """Copy some skimage photos (by stem; default: four of them) into `dir`; return `dir`."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    photos = skimage_photos()
    for name in names or DEFAULT_FOLDER:
        shutil.copyfile(photos[name], dir / photos[name].name)
    return dir


def photo_array(name: str) -> np.ndarray:
    """The named skimage photo as RGB uint8."""
    with Image.open(skimage_photos()[name]) as im:
        return np.asarray(im.convert("RGB"))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny, valid-looking PNG whose header declares `width` x `height` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def gradient16(width: int = 256, height: int = 96) -> np.ndarray:
    """A horizontal 16-bit grey ramp 0 … 65535."""
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return np.repeat(ramp[None, :], height, axis=0)


def encode(array: np.ndarray, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **save)
    return buffer.getvalue()


def exif_rotated_jpeg(array: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG of `array` stored as is, with an EXIF Orientation tag saying how to turn it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(array, "JPEG", quality=92, exif=exif.tobytes())


def hostile_folder(dir: Path) -> dict[str, str]:
    """Write a folder of good photos and hostile files; return {relative key: "ok" | "quarantine"}.

    Every "ok" image comes from a different photo (or is synthetic), so none is a near-duplicate
    of another. The symlink's target is written beside `dir` (`<dir>-outside.png`), outside it.
    Hidden files (`.DS_Store`) are not listed by a folder source and are not in the answer.
    """
    dir = Path(dir)
    (dir / "photos").mkdir(parents=True, exist_ok=True)
    photos = skimage_photos()
    expected: dict[str, str] = {}

    def write(key: str, data: bytes, verdict: str) -> None:
        (dir / key).write_bytes(data)
        expected[key] = verdict

    shutil.copyfile(photos["astronaut"], dir / "astronaut.png")
    expected["astronaut.png"] = "ok"
    write("photos/retina.jpg", photos["retina"].read_bytes(), "ok")
    rocket = photos["rocket"].read_bytes()
    write("photos/truncated.jpg", rocket[: len(rocket) // 2], "quarantine")
    write("empty.jpg", b"", "quarantine")
    write("bomb.png", bomb_png(), "quarantine")
    write("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "quarantine")
    coffee = photo_array("coffee")
    write("cmyk.jpg", _cmyk_jpeg(coffee), "ok")
    write("gray16.png", encode(gradient16(), "PNG"), "ok")
    write("rotated.jpg", exif_rotated_jpeg(photo_array("rocket")[::2, ::2]), "ok")
    hubble = Image.fromarray(photo_array("hubble_deep_field")).resize((200, 174))
    frames = [hubble, hubble.rotate(90), hubble.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    write("animated.gif", buffer.getvalue(), "ok")
    buffer = io.BytesIO()
    Image.fromarray(photo_array("chelsea")).convert("P", palette=Image.Palette.ADAPTIVE).save(
        buffer, "PNG")
    write("palette.png", buffer.getvalue(), "ok")
    moto = photo_array("motorcycle_left")[::2, ::2]
    alpha = np.full(moto.shape[:2], 255, np.uint8)
    alpha[:, : moto.shape[1] // 3] = 0  # the left third transparent
    write("rgba.png", encode(np.dstack([moto, alpha]), "PNG"), "ok")
    write("notes.txt", b"not a picture\n", "quarantine")
    write("tiny.png", encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "quarantine")
    write("panorama.png", encode(np.full((40, 800, 3), 90, np.uint8), "PNG"), "quarantine")
    (dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: not listed
    outside = dir.parent / f"{dir.name}-outside.png"
    shutil.copyfile(photos["ihc"], outside)
    (dir / "outside_link.png").symlink_to(outside)
    expected["outside_link.png"] = "quarantine"
    return dict(sorted(expected.items()))


def _cmyk_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
