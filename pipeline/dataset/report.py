"""`OUT/report.html`: a self-contained page a person opens to see what a build made.

Built from the manifest (counts, scores, accept rates) and a few samples read back through the
shard / queue / quarantine readers (the examples). No network, no JavaScript: histograms and bars
are inline SVG, thumbnails are small PNGs inlined as data URLs, and each thumbnail links to its
full-size PNG in `OUT/report/` (Chromium refuses to open a data: URL from a link, so the full-size
images are files; named by content, re-made with the page, stale ones removed). Which samples the
page shows is deterministic — per verdict the first few by index, then the first one of each edit
type not yet shown — so every (verdict, edit type) the build holds has an example, and the same
build gives the same page. The contact sheets (`pipeline.dataset.contact_sheet`) are written with
the page, from the same manifest.

What a reader needs to trust the numbers is on the page: the build's settings (config.json) at the
top, the routing thresholds drawn on the histograms, each failed routing check of a sample with its
reason, every borderline sample by id and path, scores floored (never rounded up) to three
decimals with more digits where that would put a score on the wrong side of a threshold, and,
where the editor injected faults, the judge's recall and false-reject rate against the defect log.

OUT may be an object-store prefix (`pipeline.storage`): the page, its images and the sheets are
objects written whole, and the page's links are relative, so it opens from a synced copy or
through any HTTP front of the bucket as it does from disk.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
from collections import Counter, defaultdict
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.dataset.output import DEFECTS, QUARANTINE, location_path, read_manifest, read_quarantine
from pipeline.record import EDIT_TYPES, VERDICTS, EditSample
from pipeline.dataset.shards import (CORRUPT_DATA_ERRORS, SAMPLE_JSON, atomic_write_bytes, decode_sample,
                                     iter_tar_groups, member_metadata, read_sample_dir)
from pipeline.dataset.stats import quarantine_reason, stats_from_manifest
from pipeline.routing import RoutingPolicy

log = logging.getLogger(__name__)

REPORT = "report.html"
REPORT_FILES = "report"  # OUT/report/: the full-size images the page links to
THUMB_PX = 160
SAMPLES_PER_VERDICT = 3  # per verdict, before the one-per-edit-type examples
HIST_BINS = 20
SCORES = (("score_overall", "overall"), ("score_background", "background"), ("score_quality", "quality"))
VERDICT_COLORS = {"accept": "#2e9d4f", "reject": "#c8413b", "borderline": "#d9a21b",
                  "error": "#6b6b6b", "judge_error": "#7b5bb5"}
MASK_COLORS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (80, 220, 120), (220, 90, 255),
               (0, 220, 220), (255, 140, 40), (160, 160, 255)]


# ---- numbers from the manifest -------------------------------------------------------------------

def accept_rates(rows: list[dict[str, Any]], key) -> list[tuple[Any, int, int]]:
    """(group, samples, accepted) per group; a row may fall into several groups (edit types)."""
    total: Counter = Counter()
    accepted: Counter = Counter()
    for row in rows:
        for group in key(row):
            total[group] += 1
            accepted[group] += row["verdict"] == "accept"
    return [(group, total[group], accepted[group]) for group in total]


def per_edit_type(rows: list[dict[str, Any]]) -> list[tuple[Any, int, int]]:
    found = accept_rates(rows, lambda row: set(row["sub_edit_types"] or []))
    order = {t: i for i, t in enumerate(EDIT_TYPES)}
    return sorted(found, key=lambda item: (order.get(item[0], len(order)), item[0]))


def per_sub_edit_count(rows: list[dict[str, Any]]) -> list[tuple[Any, int, int]]:
    return sorted(accept_rates(rows, lambda row: [row["num_sub_edits"] or 0]))


# ---- SVG --------------------------------------------------------------------------------------------

def histogram_svg(values_by_verdict: dict[str, list[float]], title: str,
                  width: int = 360, height: int = 150,
                  thresholds: Iterable[tuple[str, float]] = ()) -> str:
    """Stacked histogram over [0, 1] of one score, coloured by verdict, with a dashed vertical line
    at each routing threshold (name, value) on that score. Each threshold's label has a row of
    its own above the plot, on the side of its line that has room, so none is clipped or
    overlaps another (two thresholds often sit 0.02 apart)."""
    # the label farthest from the middle on the top row: a line that starts below a label never
    # crosses it (labels extend toward the middle)
    thresholds = sorted(thresholds, key=lambda t: -abs(float(t[1]) - 0.5))
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    counts = {v: np.histogram(np.clip(values, 0, 1), bins=edges)[0]
              for v, values in values_by_verdict.items() if values}
    peak = max((sum(c[i] for c in counts.values()) for i in range(HIST_BINS)), default=0) or 1
    left, right, bottom, top = 30, width - 10, 20, 18 + 12 * len(thresholds)
    height += 12 * len(thresholds)
    plot_h = height - bottom - top
    bar_w = (right - left) / HIST_BINS
    n = sum(int(c.sum()) for c in counts.values())
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="12" font-size="12">{html.escape(title)} (n={n})</text>']
    for i in range(HIST_BINS):
        y = height - bottom
        for verdict in VERDICTS:
            if verdict not in counts or not counts[verdict][i]:
                continue
            h = counts[verdict][i] / peak * plot_h
            y -= h
            parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" '
                         f'height="{h:.1f}" fill="{VERDICT_COLORS[verdict]}">'
                         f'<title>{verdict} {edges[i]:.2f}-{edges[i + 1]:.2f}: {counts[verdict][i]}</title></rect>')
    axis_y = height - bottom
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{right}" y2="{axis_y}" stroke="#333"/>')
    for k, (name, value) in enumerate(thresholds):
        x = left + float(value) * (right - left)
        label_y = 18 + 12 * k + 9
        inward = ("end", x - 3) if x > (left + right) / 2 else ("start", x + 3)
        parts.append(f'<line class="threshold" data-name="{html.escape(name)}" data-value="{value!r}" '
                     f'x1="{x:.1f}" y1="{label_y - 9}" x2="{x:.1f}" y2="{axis_y}" stroke="#000" '
                     f'stroke-dasharray="4 3"><title>{html.escape(name)} = {value!r}</title></line>'
                     f'<text class="threshold-label" x="{inward[1]:.1f}" y="{label_y}" font-size="11" '
                     f'text-anchor="{inward[0]}" paint-order="stroke" stroke="#fff" stroke-width="3">{html.escape(name)} {value!r}</text>')
    for tick in (0.0, 0.5, 1.0):
        x = left + tick * (right - left)
        parts.append(f'<text x="{x:.0f}" y="{axis_y + 14}" font-size="10" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{axis_y - plot_h + 8}" font-size="10" text-anchor="end">{peak}</text>')
    parts.append("</svg>")
    return "".join(parts)


def no_scores_note(title: str) -> str:
    """What stands in for a histogram with nothing to draw: a sentence, not an empty chart."""
    return (f'<div class=noscores><b>{html.escape(title)}</b>: none in this build — the judge gave '
            "no such score (the pixel judge rates quality only on procedural scenes, not on photo "
            "or imported pairs)</div>")


def bar(rate: float, width: int = 120) -> str:
    filled = max(0.0, min(1.0, rate)) * width
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="10">'
            f'<rect width="{width}" height="10" fill="#eee"/>'
            f'<rect width="{filled:.1f}" height="10" fill="{VERDICT_COLORS["accept"]}"/></svg>')


# ---- images -----------------------------------------------------------------------------------------

def data_url(image: np.ndarray, size: int = THUMB_PX) -> str:
    thumb = Image.fromarray(image)
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ImageFiles:
    """The full-size images a page links to: name (from the pixels, so a source shared by several
    edits is one file) → PNG bytes, written by `write_report` under OUT/report/."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, image: np.ndarray) -> str:
        """The link to `image`, relative to the report."""
        digest = hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()[:20]
        name = f"{digest}.png"
        if name not in self.files:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
            self.files[name] = buffer.getvalue()
        return f"{REPORT_FILES}/{name}"

    def write(self, out: Path) -> None:
        """Write the images into OUT/report/ and remove the ones no longer linked."""
        folder = storage.location(out) / REPORT_FILES
        if storage.is_local(folder):  # an object store has no folders to make
            folder.mkdir(exist_ok=True)
        for name, data in self.files.items():
            if not (folder / name).is_file():  # named by content: an existing file is this image
                atomic_write_bytes(folder / name, data)
        for stale in folder.glob("*.png"):
            if stale.name not in self.files:
                if storage.is_local(stale):
                    stale.unlink(missing_ok=True)
                else:
                    storage.remove_tree(stale)


BACKGROUND_CHANGE = 24  # max channel difference that marks a background pixel as changed
CHANGED_COLOR = (255, 255, 255)  # white: no sub-edit's colour, bright on the dimmed target


def background_changes(sample: EditSample) -> np.ndarray | None:
    """Pixels of the background (no sub-edit's region) that differ between source and target:
    where a background failure is, for a person to see."""
    if sample.source is None or sample.target is None or sample.background_mask is None \
            or sample.source.shape != sample.target.shape \
            or sample.background_mask.shape != sample.source.shape[:2]:
        return None
    import cv2

    diff = np.abs(sample.source.astype(np.int16) - sample.target.astype(np.int16)).max(axis=2)
    changed = ((diff > BACKGROUND_CHANGE) & sample.background_mask).astype(np.uint8)
    # grown by a few pixels: a stray speck stays visible in a 160 px thumbnail
    return cv2.dilate(changed, np.ones((7, 7), np.uint8)).astype(bool)


def mask_overlay(sample: EditSample) -> np.ndarray | None:
    """The target, dimmed, with each sub-edit's mask tinted in its own colour and each changed
    background pixel in white."""
    base = sample.target if sample.target is not None else sample.source
    if base is None or (sample.target is None and not sample.sub_edits):
        return None  # nothing to mark: the source alone says it
    image = base.astype(np.float32) * 0.45 + 255 * 0.15
    for i, edit in enumerate(sample.sub_edits):
        if edit.mask is not None and edit.mask.shape == base.shape[:2]:
            color = np.array(MASK_COLORS[i % len(MASK_COLORS)], np.float32)
            image[edit.mask] = image[edit.mask] * 0.35 + color * 0.65
    changed = background_changes(sample)
    if changed is not None:
        image[changed] = CHANGED_COLOR
    return image.clip(0, 255).astype(np.uint8)


def load_samples(out: Path, rows: list[dict[str, Any]]) -> dict[str, EditSample]:
    """The samples of `rows`, read from wherever their manifest row says (each tar read once).
    A damaged sample or tar is logged with its reason and left out; the rest are still read."""
    found: dict[str, EditSample] = {}
    by_tar: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        shard = row["shard"] or ""
        try:
            if shard.endswith(".tar"):
                by_tar[shard].add(row["id"])
            elif shard.startswith(QUARANTINE + "/"):
                found[row["id"]] = read_quarantine(out, row["id"])
            elif shard:
                found[row["id"]] = read_sample_dir(location_path(out, shard))
        except CORRUPT_DATA_ERRORS as exc:
            log.warning("report: cannot read %s from %s: %s: %s", row["id"], shard, type(exc).__name__, exc)
    for shard, ids in by_tar.items():
        try:
            for key, members in iter_tar_groups(location_path(out, shard)):
                if key not in ids:
                    continue
                try:
                    found[key] = decode_sample({"__key__": key, **members})
                except CORRUPT_DATA_ERRORS as exc:
                    log.warning("report: cannot decode %s in %s: %s: %s", key, shard, type(exc).__name__, exc)
        except CORRUPT_DATA_ERRORS as exc:
            log.warning("report: cannot read %s: %s: %s", shard, type(exc).__name__, exc)
    return found


# ---- the page ---------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.hists{display:flex;flex-wrap:wrap;gap:16px}.legend span{display:inline-block;margin-right:12px}
.sheet td{border-bottom:1px solid #ccc}.sheet img{display:block;width:160px;image-rendering:auto}
.cap{font-size:11px;color:#666}.sw{display:inline-block;width:10px;height:10px;margin-right:4px}
.err{color:#a22;font-family:monospace;font-size:12px;max-width:420px;white-space:pre-wrap}
.inst{max-width:420px}.scores{font-family:monospace;font-size:12px}
.fails{color:#a22;font-size:12px;margin:4px 0;padding-left:18px}.ex{font-size:12px}
.noscores{width:340px;padding:8px;border:1px dashed #bbb;color:#555;font-size:13px;align-self:flex-start}
.sheet a img{border:1px solid #ccc}.sheet a:hover img{border-color:#06c}.cfg{font-family:monospace;font-size:12px;max-width:760px;word-break:break-all}
"""


def plural(n: int, word: str) -> str:
    """"1 sample", "2 samples"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _rate_table(title: str, items: Iterable[tuple[Any, int, int]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(group))}</td><td class=n>{n}</td><td class=n>{acc}</td>"
        f"<td class=n>{acc / n:.1%}</td><td>{bar(acc / n)}</td></tr>"
        for group, n, acc in items if n
    )
    return (f"<table><tr><th>{html.escape(title)}</th><th>samples</th><th>accepted</th>"
            f"<th>accept rate</th><th></th></tr>{rows}</table>")


MAX_DIGITS = 12


def _floor(value: float, digits: int) -> Decimal:
    return Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_FLOOR)


def score_text(value: Any, thresholds: Iterable[float] = ()) -> str:
    """A score floored to 3 decimals, so a failing score never reads as its threshold (0.9199 →
    0.919, not 0.920); more digits where flooring would show a passing score below a threshold
    that has more than 3 decimals."""
    if value is None:
        return "–"
    exact = Decimal(repr(float(value)))
    digits = 3
    while digits < MAX_DIGITS and any(_floor(value, digits) < Decimal(repr(float(t))) <= exact
                                      for t in thresholds):
        digits += 1
    return f"{_floor(value, digits):.{digits}f}"


def _fmt(value: Any, thresholds: Iterable[float] = ()) -> str:
    return score_text(value, thresholds)


def read_config(out: Path) -> dict[str, Any]:
    try:
        config = json.loads((storage.location(out) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        log.warning("report: no readable config.json in %s: %s", out, exc)
        return {}
    return config if isinstance(config, dict) else {}


def routing_policy(config: dict[str, Any]) -> RoutingPolicy:
    """The thresholds the build routed with: the judge's own defaults, then config's overrides."""
    from pipeline.judges.base import JUDGES

    overrides = config.get("routing") or {}
    try:
        return RoutingPolicy.for_judge(JUDGES.factory(config.get("judge") or "pixel"), overrides)
    except ValueError:  # an unknown judge (a build made by another version): its overrides only
        return RoutingPolicy(**overrides)


def _settings_table(config: dict[str, Any], policy: RoutingPolicy) -> str:
    if not config:
        return "<h2>Settings</h2><p class=err>config.json is missing or unreadable</p>"
    rows = []
    for key in sorted(config):
        value = config[key]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if len(text) > 400:
            text = text[:400] + f"… ({len(text)} characters)"
        rows.append(f"<tr><th>{html.escape(key)}</th><td class=cfg>{html.escape(text)}</td></tr>")
    rows.append("<tr><th>routing thresholds in effect</th><td class=cfg>"
                + html.escape(", ".join(f"{k} {v!r}" for k, v in policy.to_dict().items())) + "</td></tr>")
    return f"<h2>Settings (config.json)</h2><table class=settings>{''.join(rows)}</table>"


def exact_scores(row: dict[str, Any], sample: EditSample | None) -> dict[str, Any]:
    """The judge's scores of a sample, as routing saw them: its record's own when it was read,
    else the manifest's (float64 columns, the same values)."""
    if sample is not None and sample.scores.get("overall") is not None:
        return sample.scores
    return {"overall": row.get("score_overall"), "background": row.get("score_background"),
            "quality": row.get("score_quality"), "sub_edits": list(row.get("sub_edit_scores") or [])}


def failed_checks(row: dict[str, Any], sample: EditSample | None, policy: RoutingPolicy) -> list[str]:
    """Each routing check the sample failed, with the score, the threshold and the judge's reason
    (`sub_edit_reasons`) where it gave one."""
    exact = exact_scores(row, sample)
    if exact.get("overall") is None:
        return []
    failed = []
    scores = exact.get("sub_edits") or []
    types = row["sub_edit_types"] or []
    reasons = (sample.scores.get("sub_edit_reasons") if sample is not None else None) or []
    t = policy.sub_edit_pass
    for i, score in enumerate(scores):
        kind = types[i] if i < len(types) else "?"
        why = f" — {reasons[i]}" if i < len(reasons) and reasons[i] else ""
        if score is None:
            failed.append(f"sub-edit {i + 1} ({kind}): unknown, the judge could not verify it{why}")
        elif float(score) < t:
            failed.append(f"sub-edit {i + 1} ({kind}): {score_text(score, [t])} < sub_edit_pass {t!r}{why}")
    for name in ("background", "overall"):
        value = exact.get(name)
        if value is None:
            continue
        reject, accept = getattr(policy, f"{name}_reject"), getattr(policy, f"{name}_accept")
        shown = score_text(value, [reject, accept])
        why = background_reason(row, sample) if name == "background" else ""
        why = f" — {why}" if why else ""
        if float(value) < reject:
            failed.append(f"{name} {shown} < {name}_reject {reject!r} (rejects){why}")
        elif float(value) < accept:
            failed.append(f"{name} {shown} < {name}_accept {accept!r}{why}")
    return failed


def background_reason(row: dict[str, Any], sample: EditSample | None) -> str:
    """The judge's reason for a background score: its own words where it gave them, else what it
    measured (share of the background changed, PSNR there), which the manifest also holds."""
    scores = sample.scores if sample is not None else {}
    if scores.get("background_reason"):
        return str(scores["background_reason"])
    changed = scores.get("background_changed", row.get("background_changed"))
    psnr = scores.get("background_psnr", row.get("background_psnr"))
    if changed is None:
        return ""
    text = f"{float(changed):.2%} of the pixels outside every sub-edit's region changed"
    return text + (f" (PSNR {float(psnr):.1f} dB there)" if psnr is not None else "")


def queued_overall(out: Path, rows: list[dict[str, Any]]) -> dict[str, float]:
    """id → the judge's exact overall score of each queued (borderline) sample, from its
    sample.json alone (no pixels decoded); a sample whose json cannot be read is left out."""
    found = {}
    for row in rows:
        if row["verdict"] != "borderline" or not row["shard"]:
            continue
        try:
            meta = member_metadata({"json": (location_path(out, row["shard"]) / SAMPLE_JSON).read_bytes()})
            if (meta.get("scores") or {}).get("overall") is not None:
                found[row["id"]] = float(meta["scores"]["overall"])
        except (OSError, *CORRUPT_DATA_ERRORS, KeyError, TypeError) as exc:
            log.warning("report: cannot read %s's json: %s: %s", row["id"], type(exc).__name__, exc)
    return found


def _borderline_list(rows: list[dict[str, Any]], policy: RoutingPolicy,
                     overall: dict[str, float]) -> str:
    """Every borderline sample: id, index, where it waits (a link relative to the report), score."""
    queued = [r for r in rows if r["verdict"] == "borderline"]
    if not queued:
        return "<h2 id=borderline>Borderline samples (0)</h2><p>none: nothing waits for a person</p>"
    items = "".join(
        f"<tr><td><code>{html.escape(r['id'])}</code></td><td class=n>{r['index']}</td>"
        f"<td><a href=\"{html.escape(r['shard'] or '')}/\">{html.escape(r['shard'] or '')}</a></td>"
        f"<td class=n>{score_text(overall.get(r['id'], r['score_overall']), [policy.overall_reject, policy.overall_accept])}</td>"
        f"<td class=inst>{html.escape(r['instruction'] or '')}</td></tr>"
        for r in queued)
    return (f"<h2 id=borderline>Borderline samples ({len(queued)})</h2><p class=cap>every sample waiting "
            "for a person (<code>mcie review push OUT</code>), by index</p><table class=borderline>"
            f"<tr><th>id</th><th>index</th><th>where</th><th>overall</th><th>instruction</th></tr>{items}</table>")


def read_defect_log(out: Path) -> dict[str, list[dict[str, Any]]]:
    """id → the editor's injected faults, from OUT/defects.jsonl (empty when there is none)."""
    path = storage.location(out) / DEFECTS
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return found
    for n, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            found[str(entry["id"])] = list(entry.get("defects") or [])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("report: %s line %d unreadable: %s", DEFECTS, n, exc)
    return found


def judge_route(row: dict[str, Any]) -> str | None:
    """What the judge's routing said: a human-decided sample was sent to a person (borderline)."""
    if row["verdict"] in ("error", "judge_error", None):
        return None
    return "borderline" if row["verdict_by"] in ("human", "both") else row["verdict"]


def judge_vs_defects(rows: list[dict[str, Any]], defects: dict[str, list]) -> dict[str, Any] | None:
    """The judge against the hidden defect log (the definitions of `pipeline.judges.bench`):
    recall = defective samples not accepted / defective samples; false-reject rate = clean samples
    rejected / clean samples. None when the build injected no fault."""
    if not any(defects.values()):
        return None
    counts = {"clean": Counter(), "defective": Counter()}
    for row in rows:
        route = judge_route(row)
        if route is None or row["id"] not in defects:
            continue
        counts["defective" if defects[row["id"]] else "clean"][route] += 1
    clean, bad = counts["clean"], counts["defective"]
    n_clean, n_bad = sum(clean.values()), sum(bad.values())
    return {
        "defective": n_bad, "clean": n_clean,
        "recall": None if not n_bad else 1 - bad["accept"] / n_bad,
        "recall_rejected": None if not n_bad else bad["reject"] / n_bad,
        "false_reject_rate": None if not n_clean else clean["reject"] / n_clean,
        "false_borderline_rate": None if not n_clean else clean["borderline"] / n_clean,
        "verdicts": {k: dict(sorted(v.items())) for k, v in counts.items()},
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _defects_section(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return ""
    f = figures
    rows = [("judge recall (defective samples not accepted)", _pct(f["recall"]), f"of {f['defective']}"),
            ("defective samples rejected", _pct(f["recall_rejected"]), f"of {f['defective']}"),
            ("false-reject rate (clean samples rejected)", _pct(f["false_reject_rate"]), f"of {f['clean']}"),
            ("clean samples sent to a person", _pct(f["false_borderline_rate"]), f"of {f['clean']}")]
    body = "".join(f"<tr><td>{a}</td><td class=n>{b}</td><td class=n>{c}</td></tr>" for a, b, c in rows)
    detail = html.escape(json.dumps(f["verdicts"], sort_keys=True))
    return ("<h2 id=faults>Judge against the injected faults</h2><p class=cap>the editor's hidden defect "
            "log (defects.jsonl), which the judge never saw; a human-decided sample counts as sent to a "
            f"person</p><table class=faults>{body}</table><p class=cap>judge routes: {detail}</p>")


def _sample_row(row: dict[str, Any], sample: EditSample | None,
                policy: RoutingPolicy = RoutingPolicy(), files: ImageFiles | None = None) -> str:
    files = files if files is not None else ImageFiles()
    cells = []
    for label, image in (("source", None if sample is None else sample.source),
                         ("target", None if sample is None else sample.target),
                         ("masks", None if sample is None else mask_overlay(sample))):
        if image is None:
            inner = "<i>no image</i>"
        else:  # the thumbnail opens the full-size image in a new tab
            inner = (f'<a href="{files.add(image)}" target="_blank" title="full size ({image.shape[1]}'
                     f'×{image.shape[0]})"><img alt="{label}" src="{data_url(image)}"></a>')
        cells.append(f"<td>{inner}<div class=cap>{label}</div></td>")
    lines = [f"<b>{html.escape(row['id'])}</b> #{row['index']} · {html.escape(row['verdict'] or '')}"
             f" by {html.escape(row['verdict_by'] or '–')}",
             f"<div class=inst>{html.escape(row['instruction'] or '')}</div>"]
    passes = row["sub_edit_pass"] or []
    exact = exact_scores(row, sample)
    scores = exact.get("sub_edits") or []
    edits = sample.sub_edits if sample is not None else []
    reasons = (sample.scores.get("sub_edit_reasons") if sample is not None else None) or []
    items = []
    for i, edit in enumerate(edits):
        color = "#%02x%02x%02x" % MASK_COLORS[i % len(MASK_COLORS)]
        score = "" if i >= len(scores) else " unknown" if scores[i] is None else \
            f" {score_text(scores[i], [policy.sub_edit_pass])}"
        failed = i < len(passes) and not passes[i]
        mark = (" ✗" if failed else " ✓") if i < len(passes) else ""
        why = f"<div class=cap>{html.escape(str(reasons[i]))}</div>" if failed and i < len(reasons) else ""
        items.append(f'<li><span class=sw style="background:{color}"></span>{html.escape(edit.type)}: '
                     f"{html.escape(edit.text)}<span class=scores>{score}{mark}</span>{why}</li>")
    if items:
        lines.append(f"<ol>{''.join(items)}</ol>")
    lines.append(f"<div class=scores>overall {_fmt(exact.get('overall'), [policy.overall_reject, policy.overall_accept])}"
                 f" · background {_fmt(exact.get('background'), [policy.background_reject, policy.background_accept])}"
                 f" · quality {_fmt(exact.get('quality'))}</div>")
    checks = failed_checks(row, sample, policy)
    if checks:
        lines.append("<ul class=fails>" + "".join(f"<li>{html.escape(c)}</li>" for c in checks) + "</ul>")
    if row["error"]:
        lines.append(f"<div class=err>{html.escape(row['error_stage'] or '')}: {html.escape(row['error'])}</div>")
    cells.append(f"<td>{''.join(lines)}</td>")
    return f"<tr id=\"ex-{html.escape(row['id'])}\">{''.join(cells)}</tr>"


def pick_examples(rows: list[dict[str, Any]], first: int) -> dict[str, list[dict[str, Any]]]:
    """verdict → the samples shown for it, by index: the first `first`, then each sample that has
    an edit type none of the earlier ones shows — every (verdict, edit type) gets an example."""
    picked = {}
    for verdict in VERDICTS:
        group = sorted((r for r in rows if r["verdict"] == verdict), key=lambda r: r["index"])
        chosen = group[:first]
        seen = {t for r in chosen for t in r["sub_edit_types"] or []}
        for row in group[first:]:
            new = set(row["sub_edit_types"] or []) - seen
            if new:
                chosen.append(row)
                seen |= new
        picked[verdict] = sorted(chosen, key=lambda r: r["index"])
    return picked


def _type_table(rows: list[dict[str, Any]], shown: dict[str, list[dict[str, Any]]]) -> str:
    """Accept rate per edit type, with a link to an example of it for each verdict."""
    links: dict[str, list[str]] = defaultdict(list)
    for verdict, group in shown.items():
        for edit_type in sorted({t for r in group for t in r["sub_edit_types"] or []}):
            example = next(r for r in group if edit_type in (r["sub_edit_types"] or []))
            links[edit_type].append(f'<a href="#ex-{html.escape(example["id"])}">{verdict}</a>')
    body = "".join(
        f"<tr><td>{html.escape(str(group))}</td><td class=n>{n}</td><td class=n>{acc}</td>"
        f"<td class=n>{acc / n:.1%}</td><td>{bar(acc / n)}</td><td class=ex>{' · '.join(links[group])}</td></tr>"
        for group, n, acc in per_edit_type(rows) if n)
    return ("<table class=types><tr><th>edit type</th><th>samples</th><th>accepted</th><th>accept rate</th>"
            f"<th></th><th>examples</th></tr>{body}</table>")


def _histograms(rows: list[dict[str, Any]], policy: RoutingPolicy) -> str:
    parts = ["<h2>Score histograms</h2><div class=legend>" + "".join(
        f'<span><span class=sw style="background:{c}"></span>{v}</span>' for v, c in VERDICT_COLORS.items()
    ) + "</div><div class=hists>"]
    for column, label in SCORES:
        by_verdict: dict[str, list[float]] = defaultdict(list)
        for row in rows:
            if row[column] is not None:
                by_verdict[row["verdict"] or "error"].append(float(row[column]))
        name = column.removeprefix("score_")
        lines = [(f"{name}_{k}", getattr(policy, f"{name}_{k}")) for k in ("reject", "accept")
                 if hasattr(policy, f"{name}_{k}")]
        parts.append(histogram_svg(by_verdict, f"{label} score", thresholds=lines) if by_verdict
                     else no_scores_note(f"{label} scores"))
    sub_scores: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        sub_scores[row["verdict"] or "error"].extend(
            float(s) for s in row["sub_edit_scores"] or [] if s is not None)
    parts.append(histogram_svg(sub_scores, "sub-edit scores", thresholds=[("sub_edit_pass", policy.sub_edit_pass)])
                 if sub_scores else no_scores_note("sub-edit scores"))
    parts.append("</div>")
    return "".join(parts)


def _sheet_links(out: Path) -> str:
    from pipeline.dataset.contact_sheet import SHEETS

    found = [(name, what) for name, what in SHEETS if (out / name).is_file()]
    if not found:
        return ""
    return ("<p>Contact sheets (source | target | instruction, one image to look through): " + ", ".join(
        f'<a href="{name}" target="_blank">{name}</a> ({what})' for name, what in found) + "</p>")


def render_report(out: Path, samples_per_verdict: int = SAMPLES_PER_VERDICT,
                  files: ImageFiles | None = None) -> str:
    """The page; the full-size images it links to are collected in `files` (see write_report)."""
    out = storage.location(out)
    files = files if files is not None else ImageFiles()
    table = read_manifest(out)
    rows = table.to_pylist()
    stats = stats_from_manifest(table)
    n = len(rows)
    config = read_config(out)
    policy = routing_policy(config)
    shown = pick_examples(rows, samples_per_verdict)
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>MCIE build {html.escape(out.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Build <code>{html.escape(str(out))}</code></h1>",
             _sheet_links(out),
             _settings_table(config, policy)]

    verdict_rows = "".join(
        f'<tr><td><span class=sw style="background:{VERDICT_COLORS.get(v, "#000")}"></span>{v}</td>'
        f"<td class=n>{stats.verdicts[v]}</td><td class=n>{stats.verdicts[v] / n:.1%}</td></tr>"
        for v in VERDICTS if stats.verdicts[v]
    ) if n else ""
    parts.append(f"<h2>Verdicts</h2><table><tr><th>verdict</th><th>samples</th><th>share</th></tr>"
                 f"{verdict_rows}<tr><th>total</th><td class=n>{n}</td><td class=n>accept rate "
                 f"{stats.accept_rate:.1%}</td></tr></table>")
    parts.append(_histograms(rows, policy))
    parts.append("<h2>Accept rate per edit type</h2><p class=cap>a sample counts for every edit "
                 "type it contains; the links jump to an example of the type with that verdict</p>"
                 + _type_table(rows, shown))
    parts.append("<h2>Accept rate per number of sub-edits</h2>"
                 + _rate_table("sub-edits", per_sub_edit_count(rows)))
    pass_rows = "".join(
        f"<tr><td>{t}</td><td class=n>{stats.sub_edits[t]}</td><td class=n>{stats.sub_edit_passes[t]}</td>"
        f"<td class=n>{stats.pass_rate(t):.1%}</td><td>{bar(stats.pass_rate(t))}</td></tr>"
        for t in EDIT_TYPES if stats.sub_edits[t]
    )
    parts.append("<h2>Sub-edits judged carried out, per edit type</h2><table><tr><th>edit type</th>"
                 f"<th>sub-edits</th><th>passed</th><th>pass rate</th><th></th></tr>{pass_rows}</table>")

    reasons = Counter(quarantine_reason(r["error_stage"], r["error"]) for r in rows if r["verdict"] == "error")
    if reasons:
        parts.append("<h2>Quarantine reasons</h2><table><tr><th>samples</th><th>reason</th></tr>" + "".join(
            f"<tr><td class=n>{count}</td><td class=err>{html.escape(reason)}</td></tr>"
            for reason, count in reasons.most_common()) + "</table>")

    parts.append(_defects_section(judge_vs_defects(rows, read_defect_log(out))))
    parts.append(_borderline_list(rows, policy, queued_overall(out, rows)))

    samples = load_samples(out, [r for group in shown.values() for r in group])
    parts.append("<h2 id=examples>Examples</h2><p class=cap>per verdict, the first samples by index and then "
                 "the first one of each edit type not yet shown. Each row: source | target | sub-edit "
                 "masks over the target (colours match the numbered sub-edits; white: background pixels "
                 "that changed) — click a thumbnail for the full-size image — | instruction, ✓/✗ = "
                 "judged carried out, scores (floored) and, in red, each routing check it failed</p>")
    for verdict, group in shown.items():
        if not group:
            continue
        parts.append(f'<h3><span class=sw style="background:{VERDICT_COLORS[verdict]}"></span>{verdict} '
                     f"({plural(stats.verdicts[verdict], 'sample')}, showing {len(group)})</h3><table class=sheet>")
        parts.extend(_sample_row(row, samples.get(row["id"]), policy, files) for row in group)
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out: Path, samples_per_verdict: int = SAMPLES_PER_VERDICT) -> Path:
    """Render OUT/report.html from a finalized build (atomically), after the dataset card and
    stats.json (`pipeline.dataset.card`) and the contact sheets (`pipeline.dataset.contact_sheet`),
    with the full-size images it links to in OUT/report/. Returns its path."""
    from pipeline.dataset.card import write_card
    from pipeline.dataset.contact_sheet import write_contact_sheets

    out = storage.location(out)
    write_card(out)  # README.md (dataset card) and stats.json: the figures, for the hub and machines
    write_contact_sheets(out)
    files = ImageFiles()
    page = render_report(out, samples_per_verdict, files)
    files.write(out)  # before the page, so no link of the new page is ever dangling
    path = out / REPORT
    atomic_write_bytes(path, page.encode())
    log.info("report written to %s", path)
    return path
