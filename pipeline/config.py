"""The build configuration: one frozen, validated dataclass, saved as OUT/config.json.

What decides the bytes of the dataset (seed, count, resolution, shard size, the four front seats
— source, grounder, composer, editor — with their options, edit and defect settings, judge and
thresholds) is the build's identity: resuming into an OUT whose saved config differs is refused.
How the build runs (workers, Ray address) is not part of it.

Each seat is chosen by name with an options dict, as the judge is. An unnamed grounder or editor
is the one the source asks for (`default_grounder`, `default_editor` on its class: a procedural
source is grounded by what it knows and edited exactly; photos get classical grounding and the
photo editor), an unnamed composer the one the editor works with (its `composer`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.record import check_edit_bounds


class ConfigError(ValueError):
    """A bad build parameter: the CLI prints it as one line and exits 2."""


# What a backend may take from the build itself (by parameter name), never from its options.
# The judge is there for editors that score candidates with the build's own judge (best of N).
BUILD_CONTEXT = ("seed", "resolution", "defect_rate", "min_edits", "max_edits", "judge",
                 "judge_options")


@dataclass(frozen=True)
class BuildConfig:
    count: int | None = None  # samples; None: every key of the source × edits_per_image
    seed: int = 0
    resolution: int = 512
    shard_size: int = 64
    defect_rate: float = 0.25
    min_edits: int = 2
    max_edits: int = 5
    judge: str = "pixel"
    judge_options: dict[str, Any] = field(default_factory=dict)  # e.g. url/model for "vllm"
    routing: dict[str, float] = field(default_factory=dict)  # RoutingPolicy overrides
    source: str = "procedural"
    source_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"path": DIR}
    grounder: str = ""  # "" = the source's default (see the module docstring)
    grounder_options: dict[str, Any] = field(default_factory=dict)
    composer: str = ""
    composer_options: dict[str, Any] = field(default_factory=dict)
    editor: str = ""
    editor_options: dict[str, Any] = field(default_factory=dict)
    edits_per_image: int = 1  # different complex instructions per source image
    rewriter: str = ""  # "" = keep the composer's grammar text; "vllm" = an LLM rewrites it
    rewriter_options: dict[str, Any] = field(default_factory=dict)
    license: str = ""  # the dataset's license (the card's); "" = the sources' own licenses

    def __post_init__(self) -> None:
        if not isinstance(self.license, str) or len(self.license) > 100 or not self.license.isprintable():
            raise ConfigError(f"license must be a short name such as cc-by-4.0, got {self.license!r}")
        self._fill_default_seats()
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ConfigError(f"count must be a positive integer, got {self.count!r}")
        if not isinstance(self.edits_per_image, int) or not 1 <= self.edits_per_image <= 64:
            raise ConfigError(f"edits per image must be within 1..64, got {self.edits_per_image!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            # int64 in the manifest; CIE-Bench relies on builds never reaching 2**63
            raise ConfigError(f"seed must be an integer within 0..2**63-1, got {self.seed!r}")
        if self.resolution < 64 or self.resolution > 4096:
            raise ConfigError(f"resolution must be within 64..4096 px, got {self.resolution}")
        if self.shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {self.shard_size}")
        if not 0.0 <= self.defect_rate <= 1.0:
            raise ConfigError(f"defect rate must be within 0..1, got {self.defect_rate}")
        try:
            check_edit_bounds(self.min_edits, self.max_edits)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._check_seats()

    def _fill_default_seats(self) -> None:
        from pipeline.editors.base import EDITORS, composer_of
        from pipeline.sources.base import SOURCES, defaults_of

        try:
            source = SOURCES.factory(self.source)
            if not self.grounder or not self.editor:
                grounder, editor = defaults_of(source)
                object.__setattr__(self, "grounder", self.grounder or grounder)
                object.__setattr__(self, "editor", self.editor or editor)
            if not self.composer:
                object.__setattr__(self, "composer", composer_of(EDITORS.factory(self.editor)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.count is None and getattr(source, "generator", False):
            raise ConfigError(f"a {self.source} build needs --count (the source has no key list)")

    def _check_seats(self) -> None:
        """Every seat's backend exists and takes the options given (nothing is built)."""
        from pipeline.compose.base import COMPOSERS
        from pipeline.editors.base import EDITORS
        from pipeline.grounders.base import GROUNDERS
        from pipeline.sources.base import SOURCES

        seats = [(SOURCES, self.source, self.source_options),
                 (GROUNDERS, self.grounder, self.grounder_options),
                 (COMPOSERS, self.composer, self.composer_options),
                 (EDITORS, self.editor, self.editor_options)]
        if self.rewriter or self.rewriter_options:  # the optional seat between composer and editor
            from pipeline.compose.rewrite import REWRITERS

            seats.append((REWRITERS, self.rewriter, self.rewriter_options))
        for registry, name, options in seats:
            if not isinstance(options, dict):
                raise ConfigError(f"{registry.seat} options must be a mapping, got {options!r}")
            clash = sorted(set(options) & set(BUILD_CONTEXT))
            if clash:
                raise ConfigError(f"{registry.seat} option {clash[0]!r} is a build parameter, "
                                  "not a backend option")
            try:
                registry.check_options(name, options, provided=BUILD_CONTEXT)
                # A backend that reads a file at config time embeds what it read (e.g. the routed
                # editor's routes), so the file's contents are part of the build's identity.
                resolve = getattr(registry.factory(name), "resolve_options", None)
                if resolve is not None:
                    object.__setattr__(self, f"{registry.seat}_options", resolve(dict(options)))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    def context(self) -> dict[str, Any]:
        """What backends may take from the build (`Registry.make(..., context=...)`)."""
        return {name: getattr(self, name) for name in BUILD_CONTEXT}

    def total_samples(self, num_keys: int | None) -> int:
        """Samples of the build for a source with `num_keys` keys (None: a generator source)."""
        available = None if num_keys is None else num_keys * self.edits_per_image
        if self.count is None:
            return int(available)
        if available is not None and self.count > available:
            raise ConfigError(f"--count {self.count} is more than the source's {num_keys} images "
                              f"× {self.edits_per_image} edits per image")
        return self.count

    def num_units(self, total: int) -> int:
        return math.ceil(total / self.shard_size)

    def unit_indices(self, unit: int, total: int) -> range:
        """Sample indices of work unit `unit` (the unit of work, retry and resume)."""
        start = unit * self.shard_size
        return range(start, min(total, start + self.shard_size))

    def key_of(self, index: int) -> tuple[int, int]:
        """(position in the source's key list, edit index) of sample `index`."""
        return divmod(index, self.edits_per_image)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown build parameters: {sorted(unknown)}")
        return cls(**data)

    # The judge's secrets never reach config.json: they come from the environment.
    def public_dict(self) -> dict[str, Any]:
        data = self.to_dict()
        for name in ("judge_options", "source_options", "grounder_options", "composer_options",
                     "editor_options", "rewriter_options"):
            data[name] = {k: v for k, v in data[name].items() if not _is_secret(k)}
        if not self.rewriter and not self.rewriter_options:  # OUTs from before the rewriter resume
            del data["rewriter"], data["rewriter_options"]
        if not self.license:  # likewise OUTs from before --license
            del data["license"]
        return data


def _is_secret(option: str) -> bool:
    return option in ("key", "token") or option.endswith(("api_key", "_token"))


def save_config(out: Path, config: BuildConfig) -> None:
    """Write OUT/config.json, or check it matches the one a previous run left there. OUT may be
    an object-store URL (`pipeline.storage.location`): the file is then one PUT."""
    from pipeline import storage

    out = storage.location(out)
    path = out / "config.json"
    wanted = config.public_dict()
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ConfigError(
                f"{out} already holds a build with different parameters ({', '.join(changed)}); "
                "resume it with the same parameters or choose another --out"
            )
        return
    if not storage.is_local(path):
        storage.write_atomic(path, (json.dumps(wanted, indent=2, sort_keys=True) + "\n").encode())
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
