"""Specialist routing (`--editor routed --editor-option routes=FILE`): each edit type goes to the
backend that does it best, e.g. text and moves to the exact photo editor, objects to an
inpainting model, backgrounds to an instruction-following one.

FILE is JSON: {"default": SPEC, "types": {EDIT_TYPE: SPEC, ...}} where a SPEC is
{"backend": "photo"} or {"backend": "inpaint" | "instruct", "path": DIR, ...that backend's
options (steps, guidance, device, dtype, ...)}. A type without an entry takes "default" (itself
{"backend": "photo"} when absent). Identical specs share one loaded model. Sub-edits are applied
in order, each by its type's backend, on the previous result: the photo editor's exact edits
(masks = exactly the pixels changed, inside the region) and the generative backends' composited
ones (`pipeline.editors.inpaint`), so pixels outside every region stay the source's. `candidates`
(best of N) and the judge apply to the generative steps. Defect injection is the photo editor's
own (`--editor photo`): a routed build injects none. The routes' sha256 (of their canonical JSON)
is part of `provenance["editor"]` with each backend's settings.

The file's CONTENTS are part of the build's identity: `resolve_options` (called by `BuildConfig`)
embeds its JSON in `editor_options["routes"]`, so OUT/config.json holds the routes themselves and
resuming after the file changed is refused like any changed parameter. Generative steps of all
routes batch together per (backend, working size), as in `pipeline.editors.inpaint`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.compose.regions import FEATHER_PX
from pipeline.editors.base import EDITORS
from pipeline.editors.inpaint import GenerativeEditor, InpaintEditor
from pipeline.editors.instruct import InstructEditor
from pipeline.record import EDIT_TYPES, EditSample, SubEdit

BACKENDS = {"inpaint": InpaintEditor, "instruct": InstructEditor}


class _Photo:
    """The photo editor's per-sub-edit edit, as a routed step (exact: no compositing needed)."""

    def edit_exact(self, sample: EditSample, i: int, previous: np.ndarray, region: np.ndarray):
        from pipeline.editors.photo import _Context, apply_photo_edit

        ctx = _Context(sample.objects, sample.private.get("donors") or {}, previous.shape[:2])
        return apply_photo_edit(previous, sample.sub_edits[i], region, ctx, i)

    def provenance(self) -> str:
        return f"photo@{__version__}"


def read_routes(path: str) -> dict[str, Any]:
    """The routes file's JSON (what the build's config embeds); ValueError saying what is wrong."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"routes file {path}: {exc}") from None
    check_routes(data, f"routes file {path}")
    return data


def check_routes(data: Any, where: str = "routes") -> dict[str, dict[str, Any]]:
    """Edit type -> spec for every type; ValueError saying what is wrong."""
    if not isinstance(data, dict) or set(data) - {"default", "types"}:
        raise ValueError(f"{where}: expected {{\"default\": SPEC, \"types\": {{...}}}}")
    types = data.get("types", {})
    unknown = sorted(set(types) - set(EDIT_TYPES)) if isinstance(types, dict) else ["?"]
    if unknown:
        raise ValueError(f"{where}: unknown edit types {unknown}; known: {EDIT_TYPES}")
    default = data.get("default", {"backend": "photo"})
    routes = {kind: types.get(kind, default) for kind in EDIT_TYPES}
    for kind, spec in routes.items():
        backend = spec.get("backend") if isinstance(spec, dict) else None
        if backend != "photo" and backend not in BACKENDS:
            raise ValueError(f"{where}: {kind}: backend must be photo, "
                             f"{' or '.join(BACKENDS)}, got {backend!r}")
    return routes


class RoutedEditor(GenerativeEditor):
    backend = "routed"

    def __init__(self, routes: str | dict[str, Any], candidates: int = 1,
                 feather: int = FEATHER_PX, seed: int = 0, judge: str = "pixel",
                 judge_options: dict[str, Any] | None = None, batch_size: int = 8):
        super().__init__(candidates, feather, seed, judge, judge_options, batch_size)
        data = read_routes(routes) if isinstance(routes, str) else routes
        specs = check_routes(data)
        self.digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        shared = dict(candidates=candidates, feather=feather, seed=seed, judge=judge,
                      judge_options=judge_options, batch_size=batch_size)
        built: dict[str, Any] = {}
        self.routes: dict[str, Any] = {}
        for kind, spec in specs.items():
            key = json.dumps(spec, sort_keys=True)
            if key not in built:
                options = {k: v for k, v in spec.items() if k != "backend"}
                if spec["backend"] == "photo":
                    if options:
                        raise ValueError(f"routes: the photo backend takes no options, got {options}")
                    built[key] = _Photo()
                else:
                    try:
                        built[key] = BACKENDS[spec["backend"]](**options, **shared)
                    except TypeError as exc:
                        raise ValueError(f"routes: {kind}: {exc}") from None
            self.routes[kind] = built[key]

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options as the build's identity holds them: a routes FILE is read and its JSON
        embedded, so a changed file is a changed parameter (a resume is refused) and workers
        never read it again."""
        if isinstance(options.get("routes"), str):
            options = {**options, "routes": read_routes(options["routes"])}
        return options

    def backend_for(self, sub: SubEdit):
        return self.routes[sub.type]

    def models(self) -> list:
        seen = {id(b): b for b in self.routes.values() if isinstance(b, GenerativeEditor)}
        return [m for b in seen.values() for m in b.models()]

    def settings(self) -> str:
        used = {}
        for kind, backend in self.routes.items():
            used.setdefault(backend.provenance(), []).append(kind)
        parts = [f"{'+'.join(kinds)}->{name}" for name, kinds in used.items()]
        return f"routes={self.digest[:12]}:" + ";".join(parts)


EDITORS.register("routed")(RoutedEditor)
