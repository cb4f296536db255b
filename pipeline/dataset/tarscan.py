"""A bounded tar header reader: what every reader of tars (OUT's shards, the webdataset source, the
trainer) lists members with, instead of Python's `tarfile`.

`tarfile` trusts the sizes a header declares: a PAX (`x`/`g`) or GNU long-name (`L`/`K`) header
declaring 1 GiB makes it allocate 1 GiB, whatever the file's size; and garbage bytes in the middle
of a tar end its iteration silently, so the members after them vanish. This reader:

- reads one 512-byte header at a time; an extended header's body (PAX records, a GNU long name) is
  read only when it declares at most `MAX_EXTENDED_HEADER_BYTES`; a bigger one is skipped unread
  and the member it describes carries an `error` (its name or size cannot be trusted);
- checks every declared size against the bytes the file really has *before* reading anything:
  a member that runs past the end of the file is damage (truncation), never an allocation;
- never reads member data itself: a `TarMember` gives its data offset and size, and the caller
  reads it (after comparing the size with its own member cap);
- on a header whose checksum fails (garbage in the middle), or zero blocks followed by more
  members, yields a `TarDamage` naming the byte range and the last good member before it, then
  resynchronises on the next valid header (a block with the `ustar` magic and a valid checksum,
  at any byte offset) and goes on, so the members after the damage are still listed.

Memory: one header block, at most one extended header body (64 KiB) and a 1 MiB window while
resynchronising, whatever the file declares. Sparse members (GNU `S`, PAX `GNU.sparse.*`) are
listed with an `error`: their declared size expands on read.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pipeline.bounds import MAX_TAR_HEADER_BYTES

BLOCK = 512
# An extended header (PAX records, a GNU long name or link) is a few hundred bytes in practice.
MAX_EXTENDED_HEADER_BYTES = MAX_TAR_HEADER_BYTES
RESYNC_WINDOW = 1024 * 1024  # bytes read at a time while looking for the next valid header

REGULAR_TYPES = (b"0", b"\0", b"7")
NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos
EXTENDED_TYPES = {b"x": "PAX", b"g": "PAX global", b"L": "GNU long-name", b"K": "GNU long-link"}
_ZERO_BLOCK = bytes(BLOCK)
_PAX_RECORD = re.compile(rb"(\d+) ")


@dataclass(frozen=True, slots=True)
class TarMember:
    name: str
    type: bytes
    offset: int  # of its (first) header
    offset_data: int
    size: int  # bytes stored in the tar (checked against the file's size)
    declared: int  # the size it declares when read (a sparse member's expanded size)
    error: str | None = None  # why it must not be read (sparse, extended header refused)

    def isreg(self) -> bool:
        return self.type in REGULAR_TYPES


@dataclass(frozen=True, slots=True)
class TarDamage:
    start: int  # first damaged byte
    end: int  # where reading resumed (the file's size when nothing valid follows)
    reason: str  # one line: what is wrong and what it cost


def scan_tar(handle: BinaryIO, size: int | None = None) -> Iterator[TarMember | TarDamage]:
    """The members and damaged regions of a plain tar open for reading, in file order.
    `size` is the file's size (default: from fstat, or for a file object with no descriptor —
    an fsspec object-store file — its `size`, else seeking to its end)."""
    if size is None:
        size = _size_of(handle)
    pos = 0
    last = "the start of the file"  # the last good member, to say where the damage is
    pending: dict[str, str] = {}  # PAX records / long names for the next member
    pending_error: str | None = None
    while pos < size:
        handle.seek(pos)
        block = handle.read(BLOCK)
        if len(block) < BLOCK:
            if block.strip(b"\0"):
                yield TarDamage(pos, size, f"{size - pos} bytes after {last} are a truncated header")
            return
        if block == _ZERO_BLOCK:  # end of archive, unless more members follow
            resume = _resync(handle, pos + BLOCK, size)
            if resume is None:
                return
            yield _damage(pos, resume, f"zero blocks (an end-of-archive marker) after {last}")
            pos, pending, pending_error = resume, {}, None
            continue
        header = _parse_header(block)
        if isinstance(header, str):
            resume = _resync(handle, pos + 1, size)
            yield _damage(pos, resume if resume is not None else size,
                          f"{header} after {last}", resume is not None)
            if resume is None:
                return
            pos, pending, pending_error = resume, {}, None
            continue
        name, kind, declared = header
        data = pos + BLOCK
        if kind in EXTENDED_TYPES:
            if declared > size - data:
                yield TarDamage(pos, size, f"a {EXTENDED_TYPES[kind]} header after {last} declares "
                                           f"{declared:,} bytes, past the end of the file (truncated)")
                return
            if kind != b"g":
                if declared > MAX_EXTENDED_HEADER_BYTES:
                    pending_error = (f"its {EXTENDED_TYPES[kind]} header declares {declared:,} bytes, "
                                     f"over the cap of {MAX_EXTENDED_HEADER_BYTES:,}")
                else:
                    handle.seek(data)
                    body = handle.read(declared)
                    if kind == b"x":
                        records = _pax_records(body)
                        if records is None:
                            pending_error = "its PAX header is malformed"
                        else:
                            pending.update(records)
                    else:
                        pending["path" if kind == b"L" else "linkpath"] = _text(body.split(b"\0", 1)[0])
            pos = data + _blocks(declared)
            continue
        error = pending_error
        name = pending.get("path", name)
        stored = declared
        if "size" in pending:
            try:
                stored = int(pending["size"])
            except ValueError:
                stored, error = 0, error or f"its PAX size {pending['size'][:40]!r} is not a number"
        expanded = stored
        if kind == b"S" or any(key.startswith("GNU.sparse.") for key in pending):
            for key in ("GNU.sparse.realsize", "GNU.sparse.size"):
                if pending.get(key, "").isdigit():
                    expanded = int(pending[key])
                    break
            error = error or "sparse member"
        if kind in NO_DATA_TYPES:
            stored = 0
        if stored < 0 or stored > size - data:  # listed (refused), then the damage that ends the tar
            remain = max(0, size - data)
            yield TarMember(name, kind, pos, data, 0, expanded,
                            f"truncated: it declares {stored:,} bytes but only {remain:,} remain")
            yield TarDamage(pos, size, f"member {name!r} declares {stored:,} bytes but only "
                                       f"{remain:,} remain (truncated)")
            return
        yield TarMember(name, kind, pos, data, stored, expanded, error)
        last = f"member {name!r}"
        pos, pending, pending_error = data + _blocks(stored), {}, None


def _size_of(handle: BinaryIO) -> int:
    try:
        return os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    size = getattr(handle, "size", None)  # fsspec files know it from the listing/HEAD
    if isinstance(size, int):
        return size
    here = handle.tell()
    end = handle.seek(0, os.SEEK_END)
    handle.seek(here)
    return end


def _damage(start: int, resume: int | None, what: str, resumed: bool = True) -> TarDamage:
    if resumed and resume is not None:
        return TarDamage(start, resume, f"{resume - start:,} bytes lost at offset {start:,} ({what}), "
                                        f"with the members stored there; resumed at the next header")
    return TarDamage(start, start, f"bytes lost from offset {start:,} to the end ({what}), with the "
                                   f"members stored there; no valid header follows")


def _blocks(count: int) -> int:
    return -(-count // BLOCK) * BLOCK


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int | None:
    """A header's numeric field: octal text, or GNU base-256 (high bit set); None if neither."""
    if field[:1] and field[0] & 0x80:
        if field[0] == 0xFF:  # negative
            return None
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = value * 256 + byte
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    if stored is None:
        return False
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    return stored in (unsigned, signed)


def _parse_header(block: bytes) -> tuple[str, bytes, int] | str:
    """(name, type, declared size) of a header block, or why it is not a header."""
    if not _checksum_ok(block):
        return "bad header checksum"
    size = _number(block[124:136])
    if size is None:
        return "unreadable header size"
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00":  # POSIX: a prefix may hold the leading directories
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    kind = block[156:157]
    text = _text(name)
    if kind == b"5" or (kind == b"\0" and text.endswith("/")):
        kind, text = b"5", text.rstrip("/")
    return text, kind, size


def _pax_records(body: bytes) -> dict[str, str] | None:
    """`LEN KEY=VALUE\\n` records of a PAX header, or None if they do not parse."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        match = _PAX_RECORD.match(body, pos)
        if match is None:
            return None
        length = int(match.group(1))
        record = body[match.end(): pos + length]
        if length <= 0 or pos + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            return None
        key, _, value = record[:-1].partition(b"=")
        records[_text(key)] = _text(value)
        pos += length
    return records


def _resync(handle: BinaryIO, start: int, size: int) -> int | None:
    """The offset of the next valid header at or after `start` (any byte offset), or None."""
    window = start
    while window < size:
        handle.seek(window)
        chunk = handle.read(RESYNC_WINDOW + BLOCK)
        found = chunk.find(b"ustar", 257)
        while found != -1 and found - 257 < RESYNC_WINDOW:
            candidate = window + found - 257
            if candidate >= start and found - 257 + BLOCK <= len(chunk):
                block = chunk[found - 257: found - 257 + BLOCK]
                if block != _ZERO_BLOCK and not isinstance(_parse_header(block), str):
                    return candidate
            found = chunk.find(b"ustar", found + 1)
        window += RESYNC_WINDOW
    return None
