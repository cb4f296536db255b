"""The files of a CIE-Bench evaluation: REPORT/report.json and a self-contained REPORT/report.html.

report.json: the summary of `pipeline.ciebench.metrics.summarize` (keys `instruction_compliance`,
`background_consistency`, `by_sub_edit_count`, `by_edit_type`, `failed`, ...), `meta` (bench,
judge, pass threshold, predictions, time) and `per_case` (every case's scores, passes, reasons and
error). report.html: the figures, their definitions, the breakdowns, the failed cases and example
cases (source | prediction | reference, instruction, per-sub-edit pass/fail), with every image
inline as a PNG data URL (thumbnails), so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.ciebench.metrics import CaseResult, PredictionError
from pipeline.record import EditSample
from pipeline.dataset.shards import temp_path

THUMB_SIDE = 256
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


def _atomic_text(path: Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def data_url(image: np.ndarray, side: int = THUMB_SIDE) -> str:
    thumb = Image.fromarray(image, "RGB")
    if max(thumb.size) > side:
        thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pick_examples(results: list[CaseResult], count: int) -> list[int]:
    """Positions of up to `count` cases spread over the sub-edit counts (round-robin over the
    counts, each in case order), so every count is shown."""
    by_count: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        by_count.setdefault(r.num_sub_edits, []).append(i)
    queues = [list(v) for _, v in sorted(by_count.items())]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return sorted(picked)


def write_report(
    out: Path,
    summary: dict[str, Any],
    results: list[CaseResult],
    bench: Path,
    predictions: Path,
    meta: dict[str, Any],
    examples: int = 24,
) -> None:
    from pipeline.ciebench.cases import read_case
    from trainer.predictions import prediction_path, read_prediction

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**summary, "meta": meta, "per_case": [r.to_json() for r in results]}
    _atomic_text(out / REPORT_JSON, json.dumps(report, indent=1) + "\n")
    shown = []
    for i in pick_examples(results, examples):
        case = read_case(bench, results[i].case_id)
        prediction = read_prediction(prediction_path(predictions, case.id))
        shown.append((case, None if isinstance(prediction, PredictionError) else prediction, results[i]))
    _atomic_text(out / REPORT_HTML, render_html(summary, meta, shown))


# ---- HTML ---------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.big{font-size:28px;font-weight:600}.pass{color:#17803d}.fail{color:#c62828}
.case{border:1px solid #ddd;border-radius:6px;padding:12px;margin:16px 0}
.imgs{display:flex;gap:12px}.imgs figure{margin:0}.imgs img{width:256px;image-rendering:pixelated;border:1px solid #bbb}
figcaption{font-size:12px;color:#555;text-align:center}.missing{width:256px;height:256px;display:flex;
align-items:center;justify-content:center;background:#fee;border:1px solid #bbb;color:#c62828}
.small{font-size:13px;color:#555}
"""

DEFINITIONS = """
<p class="small"><b>Instruction Compliance</b>: mean over cases of the share of the case's
sub-instructions the judge scores at or above the routing policy's sub-edit pass threshold.
<b>Background Consistency</b>: mean over cases of the masked SSIM between prediction and source
over the pixels outside every sub-edit region (local statistics over those pixels only; Gaussian
window, sigma 1.5), clipped to [0, 1]; cases whose regions cover the whole image have no
background and are left out of it. A missing or unreadable prediction scores 0 on both.</p>
"""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _e(text: Any) -> str:
    return html.escape(str(text))


def render_html(summary: dict[str, Any], meta: dict[str, Any],
                shown: list[tuple[EditSample, np.ndarray | None, CaseResult]]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>CIE-Bench report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>CIE-Bench report</h1>",
        f"<p class='small'>predictions {_e(meta.get('predictions'))} · judge {_e(meta.get('judge'))}"
        f" · pass threshold {_e(meta.get('sub_edit_pass_threshold'))} · bench {_e(meta.get('bench'))}"
        f" (v{_e(meta.get('bench_version'))}, {_e(meta.get('resolution'))} px)</p>",
        "<table><tr><th>Instruction Compliance</th><th>Background Consistency</th><th>cases</th>"
        "<th>cases with a background</th><th>sub-edits</th><th>failed cases</th></tr>",
        f"<tr><td class='big'>{_fmt(summary['instruction_compliance'])}</td>"
        f"<td class='big'>{_fmt(summary['background_consistency'])}</td><td>{summary['cases']}</td>"
        f"<td>{summary['consistency_cases']}</td><td>{summary['sub_edits']}</td><td>{summary['failed_cases']}</td></tr></table>",
        DEFINITIONS,
        "<h2>By number of sub-edits</h2><table><tr><th>sub-edits</th><th>cases</th>"
        "<th>Instruction Compliance</th><th>Background Consistency</th></tr>",
    ]
    for n, row in summary["by_sub_edit_count"].items():
        parts.append(f"<tr><td>{_e(n)}</td><td>{row['cases']}</td><td>{_fmt(row['instruction_compliance'])}</td>"
                     f"<td>{_fmt(row['background_consistency'])}</td></tr>")
    parts.append("</table><h2>By edit type</h2><table><tr><th>type</th><th>sub-edits</th>"
                 "<th>share carried out</th></tr>")
    for t, row in summary["by_edit_type"].items():
        parts.append(f"<tr><td>{_e(t)}</td><td>{row['sub_edits']}</td>"
                     f"<td>{_fmt(row['instruction_compliance'])}</td></tr>")
    parts.append("</table>")
    if summary["failed"]:
        parts.append("<h2>Failed cases</h2><table><tr><th>case</th><th>reason</th></tr>")
        for row in summary["failed"]:
            parts.append(f"<tr><td>{_e(row['case_id'])}</td><td>{_e(row['error'])}</td></tr>")
        parts.append("</table>")
    parts.append(f"<h2>Examples ({len(shown)})</h2>")
    for case, prediction, result in shown:
        parts.append(_case_html(case, prediction, result))
    parts.append("</body></html>")
    return "\n".join(parts)


def _figure(image: np.ndarray | None, caption: str) -> str:
    if image is None:
        return f"<figure><div class='missing'>no prediction</div><figcaption>{_e(caption)}</figcaption></figure>"
    return f"<figure><img src='{data_url(image)}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"


def _case_html(case: EditSample, prediction: np.ndarray | None, result: CaseResult) -> str:
    rows = []
    for i, edit in enumerate(case.sub_edits):
        score = result.sub_edit_scores[i] if i < len(result.sub_edit_scores) else None
        passed = result.sub_edit_pass[i] if i < len(result.sub_edit_pass) else False
        reason = result.sub_edit_reasons[i] if i < len(result.sub_edit_reasons) else ""
        mark = "<span class='pass'>✓ pass</span>" if passed else "<span class='fail'>✗ fail</span>"
        rows.append(f"<tr><td>{i + 1}</td><td>{_e(edit.type)}</td><td>{_e(edit.text)}</td>"
                    f"<td>{_fmt(score)}</td><td>{mark}</td><td class='small'>{_e(reason)}</td></tr>")
    error = f"<p class='fail'>failed: {_e(result.error)}</p>" if result.error else ""
    return (
        f"<div class='case'><h3>{_e(case.id)} · {len(case.sub_edits)} sub-edits · compliance "
        f"{_fmt(result.compliance)} · background consistency {_fmt(result.consistency)}</h3>{error}"
        f"<div class='imgs'>{_figure(case.source, 'source')}{_figure(prediction, 'prediction')}"
        f"{_figure(case.target, 'reference')}</div>"
        f"<p><b>Instruction:</b> {_e(case.instruction)}</p>"
        "<table><tr><th>#</th><th>type</th><th>sub-instruction</th><th>score</th><th>judged</th>"
        f"<th>judge's reason</th></tr>{''.join(rows)}</table></div>"
    )
