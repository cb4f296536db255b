"""The shard loader: train shards → batches of aligned (source, target, masks, sub-instructions).

Read through the bounded tar reader (`shard_samples`: webdataset's grouping, no declared size
trusted, damage skipped with a warning), made resumable by
*position* rather than by replaying batches:

- a rank reads the shards `i ≡ rank (mod world)`; each epoch visits them in a seeded order;
- a loader worker ("role") takes the samples `j ≡ role (mod workers)` of its rank's stream, so each
  role has an infinite, deterministic stream of raw samples, indexed by one integer;
- shuffling is a block shuffle: the stream is cut into blocks of `shuffle_buffer` samples, each
  permuted by a seeded generator, so the sample at any index is known without reading earlier ones;
- a batch carries `(role, index after its last sample)`; the trainer keeps the latest index per
  role, and resuming starts each role at its index: whole shards are skipped by their counts, and
  within a shard raw members are skipped without decoding. A `DataLoader` serves workers round-robin,
  so the roles are rotated by the number of batches already consumed.

A sample that fails to decode is logged and skipped (it still counts in the position).

DATA may be an object-store URL (`s3://bucket/out`, `pipeline.storage`): shards are listed with one
listing of the prefix and each tar is streamed through a file object (range reads of its headers
and members), so training needs no copy of the build on local disk. A shard travels to loader
workers as its URL; credentials come from the environment they inherit.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.dataset.shards import CORRUPT_DATA_ERRORS, DAMAGED, iter_tar_groups
from trainer.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

POSITION = "__position__"
FROZEN_MEMBER = "frozen.safetensors"  # a cached sample's frozen encodings (see trainer.cache)
# What `decode_sample` raises for a broken sample (missing member, bad image or JSON, damaged tar):
# skip it. The same list every reader of shards catches.
BAD_SAMPLE_ERRORS = CORRUPT_DATA_ERRORS


def find_shards(data: str | Path) -> list[Path]:
    """The train shards of a build `OUT` (OUT/shards/train-*.tar), or of a shard folder, local or
    at a URL. A shard that is a link to a file outside that folder is refused with one warning
    line (an object store has no links)."""
    root = storage.location(data)
    folder = root / "shards" if (root / "shards").is_dir() else root
    if not storage.is_local(folder):
        shards = sorted(folder.glob("train-*.tar"), key=lambda p: p.name)
        if not shards:
            raise FileNotFoundError(f"no train-*.tar shards under {storage.show(folder)}")
        return shards
    shards = []
    for shard in sorted(folder.glob("train-*.tar")):
        if not shard.resolve().is_relative_to(folder.resolve()):  # a link out of the build
            log.warning("shard %s links outside %s: not read", shard, folder)
            continue
        shards.append(shard)
    if not shards:
        raise FileNotFoundError(f"no train-*.tar shards under {folder}")
    return shards


def count_samples(shard: Path) -> int:
    """Samples in a shard, from the tar headers only (member data is skipped, not read), grouped
    exactly as `shard_samples` yields them. Damage (truncation, garbage between members) is
    logged: the samples around it are still counted, and the reader skips what it cannot decode."""
    count = 0
    try:
        for key, members in iter_tar_groups(shard, damage="report", read=False):
            if key == DAMAGED:
                log.warning("shard %s: %s", shard, members["__error__"])
            else:
                count += 1
    except CORRUPT_DATA_ERRORS as exc:
        log.warning("shard %s is unreadable after %d samples (%s): training reads those", shard,
                    count, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return count


def shard_samples(shard: str | Path) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (`{"__key__", "__url__", suffix: bytes}`), read by the bounded
    tar reader (`pipeline.dataset.shards.iter_tar_groups`: no declared size is trusted, a member
    over the cap or sparse is refused unread, garbage between members is skipped with a warning and
    the members after it are still read). A sample with a refused member carries `__error__`:
    `decode_sample` fails it, so it still counts in the position."""
    try:
        for key, members in iter_tar_groups(storage.location(shard), damage="report"):
            if key == DAMAGED:
                log.warning("shard %s: %s", shard, members["__error__"])
                continue
            yield {"__key__": key, "__url__": str(shard), **members}
    except CORRUPT_DATA_ERRORS as exc:
        log.warning("shard %s: unreadable: %s", shard, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


# ---- decoding and paired augmentation ---------------------------------------------------------

def _image(raw: bytes, mode: str) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as image:
        return image.convert(mode)


def decode_sample(raw: dict[str, Any], resolution: int, max_subs: int, crop_min_scale: float,
                  rng: np.random.Generator) -> dict[str, Any]:
    """Raw shard members → aligned arrays at `resolution` (one random square crop for all)."""
    if "__error__" in raw:  # a member the bounded reader refused unread
        raise ValueError(raw["__error__"])
    meta = json.loads(raw["json"])
    sub_edits = meta.get("sub_edits") or []
    if not sub_edits:
        raise ValueError("sample has no sub-edits")
    source = _image(raw["source.png"], "RGB")
    target = _image(raw["target.png"], "RGB")
    edit_mask = _image(raw["edit_mask.png"], "L")
    masks = []
    if "regions.png" in raw:  # shard format 2: bit i of one L-mode PNG is sub-edit i's mask
        bits = np.asarray(_image(raw["regions.png"], "L"))
        masks = [Image.fromarray(((bits >> i) & 1) * 255) for i in range(len(sub_edits))]
    for i in range(len(masks), len(sub_edits)):  # format 1: one mask_N.png per sub-edit
        member = f"mask_{i}.png"
        if member not in raw:
            raise KeyError(f"missing {member} for sub-edit {i}")
        masks.append(_image(raw[member], "L"))
    if any(im.size != source.size for im in [target, edit_mask, *masks]):
        raise ValueError("source, target and masks differ in size")

    width, height = source.size
    side = int(round(min(width, height) * rng.uniform(crop_min_scale, 1.0)))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    size = (resolution, resolution)

    def image(im):
        return np.asarray(im.crop(box).resize(size, Image.BICUBIC))

    def mask(im):
        return np.asarray(im.crop(box).resize(size, Image.NEAREST)) > 127

    texts = [str(s.get("text", "")) for s in sub_edits]
    regions = [mask(m) for m in masks]
    if len(texts) > max_subs:  # the model has max_subs slots: the last one takes the rest
        texts = texts[: max_subs - 1] + [" and ".join(texts[max_subs - 1:])]
        regions = regions[: max_subs - 1] + [np.logical_or.reduce(regions[max_subs - 1:])]
    sub_masks = np.zeros((max_subs, resolution, resolution), dtype=np.float32)
    sub_masks[: len(regions)] = np.stack(regions)
    source_uint8 = image(source)
    sample = {
        "key": raw["__key__"],
        "instruction": meta.get("instruction", ""),
        "sub_texts": texts,
        "source_uint8": source_uint8,
        "source": to_tensor(source_uint8),
        "target": to_tensor(image(target)),
        "edit_mask": torch.from_numpy(mask(edit_mask)).float()[None],
        "sub_masks": torch.from_numpy(sub_masks),
        "sub_valid": torch.arange(max_subs) < len(texts),
    }
    if FROZEN_MEMBER in raw:
        from safetensors.torch import load

        sample["frozen"] = load(raw[FROZEN_MEMBER])
    return sample


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 → float 3xHxW in [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1.0


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        if key == "frozen":
            batch[key] = collate_frozen(values)
        elif isinstance(value, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(value, np.ndarray):
            batch[key] = np.stack(values)
        else:
            batch[key] = values
    return batch


def collate_frozen(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Cached encodings: stack the latents, right-pad the tokens (hidden, spans), mark them in `valid`."""
    length = max(item["hidden"].shape[0] for item in items)
    first = items[0]
    hidden = torch.zeros(len(items), length, first["hidden"].shape[1], dtype=first["hidden"].dtype)
    spans = torch.zeros(len(items), first["spans"].shape[0], length, dtype=torch.bool)
    valid = torch.zeros(len(items), length, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item["hidden"].shape[0]
        hidden[i, :n], spans[i, :, :n], valid[i, :n] = item["hidden"], item["spans"], True
    return {"source_latents": torch.stack([item["source_latents"] for item in items]),
            "target_latents": torch.stack([item["target_latents"] for item in items]),
            "hidden": hidden, "spans": spans, "valid": valid}


# ---- the positionable stream -------------------------------------------------------------------

@dataclass
class LoaderState:
    """Where each role's stream stands, and how many batches were consumed (for the rotation)."""

    positions: list[int]
    batches: int = 0

    @classmethod
    def fresh(cls, roles: int) -> "LoaderState":
        return cls(positions=[0] * roles)

    def advance(self, batch: dict[str, Any]) -> None:
        role, position = batch[POSITION]
        self.positions[role] = position
        self.batches += 1

    def to_json(self) -> dict[str, Any]:
        return {"positions": list(self.positions), "batches": self.batches}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LoaderState":
        return cls(positions=list(data["positions"]), batches=int(data["batches"]))


@dataclass
class ShardStream(IterableDataset):
    shards: list[str]  # this rank's shards
    counts: list[int]
    train: TrainConfig
    resolution: int
    max_subs: int
    state: LoaderState = field(default_factory=lambda: LoaderState.fresh(1))
    rank: int = 0

    def __post_init__(self) -> None:
        self.roles = len(self.state.positions)
        self.total = sum(self.counts)
        if self.total < self.roles:
            raise ValueError(f"{self.total} samples cannot feed {self.roles} loader workers")

    def role_length(self, role: int) -> int:
        return len(range(role, self.total, self.roles))

    def epoch_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.train.seed, self.rank, epoch, 1])
        return list(rng.permutation(len(self.shards)))

    def _epoch_raw(self, epoch: int, start: int) -> Iterator[tuple[int, dict]]:
        """(index in the rank's epoch stream, raw sample) from index `start` on."""
        order = self.epoch_order(epoch)
        offset = 0
        for shard in order:
            count = self.counts[shard]
            if offset + count <= start:  # skip whole shards by their counts
                offset += count
                continue
            skip = max(0, start - offset)
            samples = shard_samples(self.shards[shard])
            for index, raw in enumerate(itertools.islice(samples, skip, None), offset + skip):
                yield index, raw
            offset += count

    def _role_epoch(self, role: int, epoch: int, start: int) -> Iterator[dict]:
        """The role's raw samples of `epoch` from role index `start` (no decoding)."""
        for index, raw in self._epoch_raw(epoch, start * self.roles + role):
            if index % self.roles == role:
                yield raw

    def role_stream(self, role: int, start: int) -> Iterator[tuple[int, dict | None]]:
        """(position after the sample, decoded sample or None) from position `start`, forever."""
        length = self.role_length(role)
        size = self.train.shuffle_buffer
        position = start
        while True:
            epoch, within = divmod(position, length)
            first_block = within // size
            reader = self._role_epoch(role, epoch, first_block * size)
            for block in range(first_block, -(-length // size)):
                lo, hi = block * size, min(length, (block + 1) * size)
                raws = list(itertools.islice(reader, hi - lo))
                if len(raws) < hi - lo:
                    log.warning("rank %d role %d epoch %d: expected %d samples in block %d, read %d",
                                self.rank, role, epoch, hi - lo, block, len(raws))
                    raws += [None] * (hi - lo - len(raws))
                order = np.random.default_rng([self.train.seed, self.rank, role, epoch, block]).permutation(hi - lo)
                for k in range(max(lo, within) - lo, hi - lo):
                    position = epoch * length + lo + k + 1
                    yield position, self._decode(raws[order[k]], epoch)
            position = (epoch + 1) * length

    def _decode(self, raw: dict | None, epoch: int) -> dict | None:
        if raw is None:
            return None
        key = raw.get("__key__", "?")
        rng = np.random.default_rng([self.train.seed, epoch, zlib.crc32(key.encode())])
        # cached encodings are of the whole image: no random crop for those samples
        crop = 1.0 if FROZEN_MEMBER in raw else self.train.crop_min_scale
        try:
            return decode_sample(raw, self.resolution, self.max_subs, crop, rng)
        except BAD_SAMPLE_ERRORS as exc:
            log.warning("skipping sample %s of %s: %s: %s", key, raw.get("__url__", "?"),
                        type(exc).__name__, exc)
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # The DataLoader serves its workers round-robin from worker 0: rotate roles so the batch
        # after `batches` consumed ones comes from the role that would have served it.
        role = (worker + self.state.batches) % self.roles
        pending: list[dict] = []
        for position, sample in self.role_stream(role, self.state.positions[role]):
            if sample is not None:
                pending.append(sample)
            if len(pending) == self.train.batch_size:
                batch = collate(pending)
                batch[POSITION] = (role, position)
                pending = []
                yield batch


def make_loader(data: str | Path, train: TrainConfig, model: ModelConfig, state: LoaderState | None = None,
                rank: int = 0, world: int = 1) -> tuple[DataLoader, LoaderState]:
    shards = find_shards(data)
    if len(shards) < world:
        raise ValueError(f"{len(shards)} shards cannot be split over {world} processes")
    mine = shards[rank::world]
    roles = max(1, train.num_workers)
    state = state or LoaderState.fresh(roles)
    if len(state.positions) != roles:
        raise ValueError(f"checkpoint was taken with {len(state.positions)} loader workers; "
                         f"resume with train.num_workers={len(state.positions)}")
    stream = ShardStream([str(s) for s in mine], [count_samples(s) for s in mine], train,
                         model.resolution, model.max_sub_edits, state, rank)
    # A private generator: creating the loader must not draw from the global RNG (exact resume).
    loader = DataLoader(stream, batch_size=None, num_workers=train.num_workers,
                        generator=torch.Generator().manual_seed(train.seed),
                        persistent_workers=False)
    return loader, state
