"""Where a build's files live: a local path or an fsspec URL (`s3://`, `gs://`, `memory://`, ...).

`location(text)` turns what a user wrote (`--out`, `--source-path`, a `path` option) into a
path object: a `pathlib.Path` for a local path or a `file://` URL, a `upath.UPath` for any other
URL. Both speak pathlib (`/`, `name`, `exists`, `is_file`, `iterdir`, `glob`, `open`,
`read_bytes`), so readers are written once. What pathlib cannot say the same way on a bucket is
here, and only here:

- `atomic_file` / `write_atomic`: a file appears under its final name only once complete. Local:
  a hidden temporary in the same folder, fsync, `os.replace`. Object store: the bytes are
  buffered and sent as ONE object write (`pipe_file`: a PUT, or a multipart upload completed at
  the end), and an object store shows an object only once its upload is complete.
- `create_exclusive`: make a file only if it does not exist (local `O_EXCL`; S3
  `If-None-Match: *`, a 412 when it exists). The OUT lock is built on it.
- `remove_tree`, `is_local`, `local_path`, `fs_path`.

Credentials and other fsspec options come from the environment fsspec and botocore already read
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `FSSPEC_S3_*`, ...) and from `--storage-option K=V`,
which the CLI puts in `MCIE_STORAGE_OPTIONS` (JSON) so Ray workers inherit them. They are never
written to OUT or logged: `config.json` holds URLs only. Listing caches are off on object stores:
workers write while the driver lists, and a cached listing would hide their files.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

STORAGE_ENV = "MCIE_STORAGE_OPTIONS"  # JSON {protocol or "*": {option: value}} or {option: value}
TEMP_SUFFIX = ".tmp"

AnyPath = Any  # pathlib.Path or upath.UPath: both are pathlib-like


def is_url(text: str | os.PathLike) -> bool:
    """True for `scheme://...` with a scheme other than `file` (a local path otherwise)."""
    if isinstance(text, Path) and not _is_upath(text):
        return False
    scheme = urlsplit(str(text)).scheme
    return len(scheme) > 1 and scheme != "file" and "://" in str(text)


def _is_upath(path: Any) -> bool:
    try:
        from upath import UPath
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(path, UPath) and getattr(path, "protocol", "") not in ("", "file", "local")


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for `protocol`: `MCIE_STORAGE_OPTIONS` (either `{option: value}` for every
    protocol, or `{protocol: {...}, "*": {...}}`), with listing caches off."""
    raw = os.environ.get(STORAGE_ENV, "").strip()
    try:
        given = json.loads(raw) if raw else {}
    except ValueError:
        raise ValueError(f"{STORAGE_ENV} is not JSON") from None
    if not isinstance(given, dict):
        raise ValueError(f"{STORAGE_ENV} must be a JSON object")
    if any(isinstance(v, dict) for v in given.values()):
        options = {**given.get("*", {}), **given.get(protocol, {})}
    else:
        options = dict(given)
    if protocol in ("s3", "s3a", "gs", "gcs", "az", "abfs"):
        options.setdefault("use_listings_cache", False)
    return options


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """`K=V` pairs (the CLI's `--storage-option`) → options; values parse as JSON when they can
    (`anon=true`, `client_kwargs={"region_name": "x"}`), else stay strings. ValueError naming the
    bad pair (without its value: it may be a secret)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {key.strip()[:40]!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def location(value: str | os.PathLike) -> AnyPath:
    """A path object for a local path, a `file://` URL or an fsspec URL."""
    if isinstance(value, Path) or _is_upath(value):
        return value
    text = os.fspath(value)
    if text.startswith("file://"):
        return Path(urlsplit(text).path)
    if not is_url(text):
        return Path(text)
    from upath import UPath

    protocol = urlsplit(text).scheme
    return UPath(text.rstrip("/"), **storage_options(protocol))


def is_local(path: AnyPath) -> bool:
    return not _is_upath(path)


def local_path(path: AnyPath) -> Path | None:
    """The local `Path` of a local location, None for an object-store one."""
    return Path(os.fspath(path)) if is_local(path) else None


def fs_path(path: AnyPath) -> tuple[Any, str]:
    """(fsspec filesystem, the path string it takes) for any location."""
    if is_local(path):
        import fsspec

        return fsspec.filesystem("file"), str(Path(path).absolute())
    return path.fs, path.path


def show(path: AnyPath) -> str:
    """How a location is named in messages and in the manifest-side records (a URL or a path)."""
    return str(path)


# ---- writes that appear whole -----------------------------------------------------------------------

def temp_path(path: AnyPath) -> AnyPath:
    """A unique temporary name beside a local `path`: `.NAME.<random>.tmp` (hidden, never matched
    by the globs that find final files)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


@contextmanager
def atomic_file(path: AnyPath) -> Iterator[IO[bytes]]:
    """Write a file that appears under `path` only once complete. On an exception nothing
    appears and an existing `path` is left as it was."""
    if is_local(path):
        path = Path(path)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    buffer = io.BytesIO()
    yield buffer
    write_atomic(path, buffer.getvalue())


def write_atomic(path: AnyPath, data: bytes) -> None:
    if is_local(path):
        with atomic_file(path) as handle:
            handle.write(data)
        return
    fs, name = fs_path(path)
    fs.pipe_file(name, bytes(data))  # one PUT / one completed multipart upload


def create_exclusive(path: AnyPath, data: bytes) -> bool:
    """Create `path` holding `data` only if nothing is there: True when this call made it, False
    when it already existed. OSError for anything else (a store that cannot say is the caller's
    business: see `pipeline.dataset.lock`)."""
    if is_local(path):
        try:
            fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True
    fs, name = fs_path(path)
    try:
        fs.pipe_file(name, bytes(data), mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs maps 412 PreconditionFailed to EINVAL with this text
        if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
            return False
        raise
    return True


def remove_tree(path: AnyPath) -> None:
    """Remove a file or a folder (prefix) with everything under it, if it exists."""
    if is_local(path):
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    fs, name = fs_path(path)
    try:
        if fs.isdir(name):
            fs.rm(name, recursive=True)
        elif fs.exists(name):
            fs.rm_file(name)
    except FileNotFoundError:
        pass


def objects_under(root: AnyPath, suffix: str = "") -> dict[str, AnyPath]:
    """{key relative to `root`: location} of every object under an object-store prefix whose
    name ends with `suffix`, hidden names (a part starting with ".") skipped as a local walk
    skips them, sorted; one paginated listing (`fs.find`). (Added for the file sources.)"""
    fs, prefix = fs_path(root)
    prefix = prefix.rstrip("/") + "/"
    names = sorted(n[len(prefix):] for n in fs.find(prefix) if n.startswith(prefix))
    return {n: root / n for n in names if n and n.endswith(suffix)
            and not any(part.startswith(".") for part in n.split("/"))}


def child_names(folder: AnyPath, folders: bool = False) -> list[str]:
    """Sorted names of what lies directly under `folder` (none when it does not exist); with
    `folders`, only the sub-folders. On an object store, only children that hold an object (one
    listing, `fs.find`): some stores (SeaweedFS) go on listing a prefix after its last object was
    deleted, and a moved review or rejudge sample must not look queued. (Added for OUT's readers.)"""
    if is_local(folder):
        folder = Path(folder)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not folders or p.is_dir())
    fs, prefix = fs_path(folder)
    prefix = prefix.rstrip("/") + "/"
    keys = [n[len(prefix):] for n in fs.find(prefix) if n.startswith(prefix)]
    return sorted({k.split("/", 1)[0] for k in keys if k and (not folders or "/" in k)})


def children(folder: AnyPath) -> list[AnyPath]:
    """What lies directly under `folder`, sorted by name; nothing when it does not exist. On an
    object store only children that hold an object (`child_names`)."""
    return [folder / name for name in child_names(folder)]


def access_error(exc: BaseException) -> str | None:
    """One line for an error of reaching an object store that fsspec passes through unmapped
    (botocore's: no credentials, an endpoint that does not answer, ...); None for anything else."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - s3fs brings botocore
        return None
    if isinstance(exc, (BotoCoreError, ClientError)):
        return str(exc).splitlines()[0][:300] or type(exc).__name__
    return None
