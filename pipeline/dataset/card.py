"""The dataset card: `OUT/README.md` (a YAML header the Hugging Face hub reads, then tables for
people) and `OUT/stats.json` (the same figures for machines), written with the report.

Every figure comes from the manifest and config.json alone (`build_figures`), so the card of a
resumed or reviewed build is recomputed, never patched. The license is, in order: config.json's
`license`, else the licenses the sources recorded (`source_meta.license`), else "other".
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pipeline.dataset.output import read_manifest
from pipeline.dataset.shards import atomic_write_bytes
from pipeline.storage import location
from pipeline.record import COLUMN_MEANINGS, SHARD_FORMAT

CARD = "README.md"
STATS = "stats.json"

LIMITATIONS = (
    "The judge's verdicts are automatic: an accepted sample can still carry an edit the judge "
    "could not see (its recall against injected faults is in report.html where the build injected "
    "them).",
    "Regions are the pixels the editor changed (or was allowed to change); they are not "
    "semantic segmentations of the objects.",
    "Procedural scenes are synthetic; photo edits come from classical or generative editors and "
    "may look unnatural at region borders.",
    "Instructions are composed from a grammar (optionally rewritten by an LLM): their wording is "
    "less varied than human requests.",
)


def parts_digest(out: Path) -> str:
    """sha256 over the units' manifest parts and defect logs (names and bytes): what the merge,
    the card and the report were made from. stats.json records it, so a build's completion is
    a fact of the bytes, not of file times (a `cp -r` keeps it complete)."""
    digest = hashlib.sha256()
    for path in sorted((location(out) / "parts").glob("unit-*"), key=lambda p: p.name):
        if path.is_file():
            digest.update(f"{path.name}\n{path.stat().st_size}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def recorded_parts_digest(out: Path) -> str | None:
    """The parts digest stats.json was written from, or None (no or unreadable stats.json)."""
    try:
        return json.loads((location(out) / STATS).read_text()).get("parts_digest")
    except (OSError, ValueError, AttributeError):
        return None


def size_category(n: int) -> str:
    """The hub's size_categories bucket."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


def _config(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def build_figures(out: Path) -> dict[str, Any]:
    """Everything the card and stats.json say, from the manifest and config.json."""
    out = location(out)
    rows = read_manifest(out).to_pylist()
    config = _config(out)
    verdicts = Counter(r["verdict"] for r in rows)
    types: dict[str, Counter] = defaultdict(Counter)
    counts: dict[int, Counter] = defaultdict(Counter)
    for row in rows:
        if row["verdict"] in ("error",):
            continue
        counts[row["num_sub_edits"] or 0]["samples"] += 1
        counts[row["num_sub_edits"] or 0][row["verdict"]] += 1
        passes = row["sub_edit_pass"] or []
        for i, kind in enumerate(row["sub_edit_types"] or []):
            types[kind]["sub_edits"] += 1
            if i < len(passes) and passes[i]:
                types[kind]["passed"] += 1
            if row["verdict"] == "accept":
                types[kind]["in_accepted"] += 1
    licenses = sorted({str(lic) for lic in _source_licenses(rows, out)})
    versions = {
        "code": sorted({r["code_version"] for r in rows if r["code_version"]}),
        "source": sorted({r["source_kind"] for r in rows if r["source_kind"]}),
        "editor": sorted({r["editor"] for r in rows if r["editor"]}),
        "judge": sorted({r["judge"] for r in rows if r["judge"]}),
    }
    return {
        "format": SHARD_FORMAT,
        "parts_digest": parts_digest(out),
        "samples": len(rows),
        "verdicts": dict(sorted(verdicts.items())),
        "corrected_by_humans": sum(1 for r in rows if r["corrected"]),
        "edit_types": {k: dict(v) for k, v in sorted(types.items())},
        "sub_edit_counts": {str(k): dict(v) for k, v in sorted(counts.items())},
        "judge": {"name": config.get("judge"), "options": _public(config.get("judge_options", {}))},
        "routing": config.get("routing", {}),
        "settings": {k: config.get(k) for k in ("seed", "resolution", "shard_size", "defect_rate",
                                                "min_edits", "max_edits", "edits_per_image", "source",
                                                "grounder", "composer", "editor")},
        "versions": versions,
        "license": config.get("license") or (licenses[0] if len(licenses) == 1 else "other"),
        "source_licenses": licenses,
        "shards": {"train": sorted(p.name for p in (out / "shards").glob("train-*.tar")),
                   "negatives": sorted(p.name for p in (out / "shards").glob("negatives-*.tar"))},
    }


def _public(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if not any(s in k.lower() for s in ("key", "token", "secret", "password"))}


def _source_licenses(rows: list[dict], out: Path) -> set[str]:
    """Licenses the sources recorded, read from the train shards' json (bounded: first 200)."""
    from pipeline.dataset.shards import CORRUPT_DATA_ERRORS, iter_tar_groups, member_metadata

    found: set[str] = set()
    seen = 0
    for tar in sorted((out / "shards").glob("*.tar"), key=lambda p: p.name):
        try:
            for _, members in iter_tar_groups(tar):
                meta = member_metadata(members)
                lic = (meta.get("source_meta") or {}).get("license")
                if lic:
                    found.add(str(lic))
                seen += 1
                if seen >= 200:
                    return found
        except CORRUPT_DATA_ERRORS:
            continue
    return found


# ---- the card ---------------------------------------------------------------------------------------

def _yaml_header(license: str, samples: int, configs: list[tuple[str, list[tuple[str, str]]]]) -> str:
    lines = ["---", f"license: {json.dumps(license)}", "task_categories:", "- image-to-image",
             "tags:", "- image-editing", "- instruction-based-image-editing", "- webdataset",
             "size_categories:", f"- {size_category(samples)}", "configs:"]
    for name, files in configs:
        lines.append(f"- config_name: {name}")
        lines.append("  data_files:")
        for split, pattern in files:
            lines += [f"  - split: {split}", f"    path: {json.dumps(pattern)}"]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def render_card(figures: dict[str, Any]) -> str:
    configs = [("default", [("train", "shards/train-*.tar")]
                + ([("negatives", "shards/negatives-*.tar")] if figures["shards"]["negatives"] else []))]
    parts = [_yaml_header(figures["license"], figures["samples"], configs)]
    parts.append("\n# Complex-edit dataset (mcie factory build)\n\n"
                 "Source image, complex instruction, target image and one region per sub-edit. "
                 f"Shard format {figures['format']}: webdataset tars whose samples all have `json`, "
                 "`source.png`, `target.png`, `edit_mask.png` and `regions.png` (bit i = sub-edit "
                 "i's mask; each sub-edit's mask is also in the json as COCO RLE). They load with "
                 "`datasets.load_dataset(\"webdataset\", ...)`, Ray Data `read_webdataset` and "
                 "webdataset. `manifest.parquet` lists every sample; its schema metadata explains "
                 "each column.\n")
    parts.append("\n## Counts\n\n" + _table(["verdict", "samples"], [[k, v] for k, v in figures["verdicts"].items()]))
    parts.append(f"\nSamples corrected by a human reviewer: {figures['corrected_by_humans']}.\n")
    parts.append("\n## Edit types\n\n" + _table(
        ["edit type", "sub-edits", "judged carried out", "in accepted samples"],
        [[k, v.get("sub_edits", 0), v.get("passed", 0), v.get("in_accepted", 0)]
         for k, v in figures["edit_types"].items()]))
    parts.append("\n## Sub-edits per sample\n\n" + _table(
        ["sub-edits", "samples", "accepted", "rejected", "borderline"],
        [[k, v.get("samples", 0), v.get("accept", 0), v.get("reject", 0), v.get("borderline", 0)]
         for k, v in figures["sub_edit_counts"].items()]))
    parts.append("\n## Judge and routing\n\n" + _table(
        ["setting", "value"],
        [["judge", figures["judge"]["name"]], ["judge options", json.dumps(figures["judge"]["options"], sort_keys=True)],
         ["routing", json.dumps(figures["routing"], sort_keys=True) or "defaults"]]
        + [[k, json.dumps(v)] for k, v in figures["settings"].items()]))
    parts.append("\n## Versions\n\n" + _table(
        ["part", "versions"], [[k, ", ".join(v) or "-"] for k, v in figures["versions"].items()]))
    parts.append("\n## Manifest columns\n\n" + _table(["column", "meaning"], [[k, v] for k, v in COLUMN_MEANINGS.items()]))
    parts.append("\n## Known limitations\n\n" + "".join(f"- {line}\n" for line in LIMITATIONS))
    return "".join(parts)


def write_card(out: Path) -> tuple[Path, Path]:
    """Write OUT/README.md and OUT/stats.json (atomically) from a finalized build."""
    out = location(out)
    figures = build_figures(out)
    atomic_write_bytes(out / STATS, (json.dumps(figures, indent=1, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / CARD, render_card(figures).encode())
    return out / CARD, out / STATS


def export_card(out: Path, summary: dict[str, Any], license: str | None) -> str:
    """The card of an export directory: its parquet configs, then the build's figures."""
    figures = build_figures(out)
    if license:
        figures["license"] = license
    configs = [("default", [("train", "data/train-*.parquet")])]
    if summary.get("preference_pairs"):
        configs.append(("preference", [("train", "preference/train-*.parquet")]))
    header = _yaml_header(figures["license"], summary["samples"], configs)
    body = render_card(figures).split("---\n", 2)[2]
    note = (f"\nExported with `mcie export --format {summary['format']} --verdict {summary['verdict']}`: "
            f"{summary['samples']} samples, {summary['preference_pairs']} preference pairs.\n")
    return header + note + body
