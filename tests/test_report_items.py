"""report.html says what a reader needs to trust it: the build's settings, the routing thresholds on
the histograms, each failed check's reason, every borderline sample, scores that never round onto
a threshold, and the judge's recall / false-reject rate against the injected faults."""

from __future__ import annotations

import html
import json
import re

import pytest

from labelstudio_fixtures import make_build
from pipeline.dataset.output import DEFECTS, read_manifest
from pipeline.dataset.report import failed_checks, render_report, score_text
from pipeline.routing import RoutingPolicy

CONFIG = {"count": 9, "shard_size": 4, "seed": 11, "judge": "pixel", "judge_options": {},
          "routing": {"overall_accept": 0.95}, "editor": "procedural", "defect_rate": 0.3}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """5 borderline (overall 0.9199, 0.3, 0.7, 0.3, 0.7), 3 accepted, 1 rejected; the hand-made
    samples carry an injected fault at every index divisible by 3 (0, 3, 6)."""
    out = tmp_path_factory.mktemp("report-items")
    ids = make_build(out, borderline=5, extra_accept=3,
                     overall=lambda i: 0.9199 if i == 0 else (0.7 if i % 2 == 0 else 0.3))
    (out / "config.json").write_text(json.dumps(CONFIG))
    return out, ids


def test_settings_at_the_top(build):
    out, _ = build
    page = render_report(out, samples_per_verdict=1)
    settings = page[page.index("Settings (config.json)"):page.index("Verdicts")]
    for key, value in CONFIG.items():
        assert f"<th>{key}</th>" in settings
    assert html.escape('{"overall_accept": 0.95}') in settings
    # the thresholds in effect: the judge's defaults with config's override
    assert "overall_accept 0.95" in settings and "sub_edit_pass 0.92" in settings
    assert page.index("Settings (config.json)") < page.index("Score histograms")


def test_threshold_lines_on_the_histograms(build):
    out, _ = build
    page = render_report(out, samples_per_verdict=1)
    lines = re.findall(r'<line class="threshold" data-name="([a-z_]+)" data-value="([0-9.]+)" x1="([0-9.]+)"', page)
    assert {(name, float(value)) for name, value, _ in lines} == {
        ("overall_reject", 0.7), ("overall_accept", 0.95), ("background_reject", 0.5),
        ("background_accept", 0.9), ("sub_edit_pass", 0.92)}
    left, right = 30, 360 - 10  # the plot's x range: a line sits at its value along it
    for _, value, x in lines:
        assert float(x) == pytest.approx(left + float(value) * (right - left), abs=0.06)


def test_threshold_labels_are_whole_and_apart(build):
    """Each label fits inside its chart on its own row (the 0.9 and 0.92 labels were clipped:
    "overall_", "backgrou")."""
    out, _ = build
    page = render_report(out, samples_per_verdict=1)
    charts = re.findall(r'<svg[^>]*width="(\d+)"[^>]*>(.*?)</svg>', page)
    labelled = 0
    for width, body in charts:
        labels = re.findall(r'<text class="threshold-label" x="([0-9.]+)" y="(\d+)" font-size="(\d+)" '
                            r'text-anchor="(start|end)"[^>]*>([^<]+)</text>', body)
        assert len({y for _, y, _, _, _ in labels}) == len(labels)  # a row each
        for x, _, size, anchor, text in labels:
            extent = 0.62 * int(size) * len(text)  # DejaVu Sans: ≈ 0.6 em per character
            assert (float(x) - extent >= 0) if anchor == "end" else (float(x) + extent <= int(width)), text
            labelled += 1
    assert labelled == 5  # overall and background reject/accept, sub_edit_pass


def test_a_score_nobody_gave_is_said_in_words_not_charted():
    from pipeline.dataset.report import _histograms

    rows = [{"verdict": "accept", "score_overall": 0.95, "score_background": 1.0, "score_quality": None,
             "sub_edit_scores": [1.0, None]}] * 3
    section = _histograms(rows, RoutingPolicy())
    assert "overall score (n=3)" in section and "sub-edit scores (n=3)" in section
    assert "quality score (n=" not in section and section.count("<svg") == 3
    assert "<b>quality scores</b>: none in this build" in section


def test_one_sample_is_singular(build):
    out, _ = build
    page = render_report(out, samples_per_verdict=1)
    assert "reject (1 sample, showing 1)" in page and "1 samples" not in page
    assert "borderline (5 samples, showing" in page


def test_failed_checks_with_reasons():
    policy = RoutingPolicy()
    row = {"score_overall": 0.8, "score_background": 0.49, "sub_edit_scores": [0.95, 0.9199, None],
           "sub_edit_types": ["recolor", "add", "remove"], "background_changed": 0.0123,
           "background_psnr": 31.04}

    class Scored:
        scores = {"sub_edit_reasons": ["", "the hat is missing", "cannot see it"]}

    assert failed_checks(row, Scored(), policy) == [
        "sub-edit 2 (add): 0.919 < sub_edit_pass 0.92 — the hat is missing",
        "sub-edit 3 (remove): unknown, the judge could not verify it — cannot see it",
        "background 0.490 < background_reject 0.5 (rejects) — 1.23% of the pixels outside every "
        "sub-edit's region changed (PSNR 31.0 dB there)",
        "overall 0.800 < overall_accept 0.92",
    ]

    class Worded:  # a judge that says why in its own words: those are shown
        scores = {"background_reason": "the sky turned green"}

    assert "background 0.490 < background_reject 0.5 (rejects) — the sky turned green" in \
        failed_checks(row, Worded(), policy)
    assert failed_checks({**row, "score_overall": None}, None, policy) == []  # not judged


def test_contact_sheet_shows_each_failed_check(build):
    out, _ = build
    page = render_report(out, samples_per_verdict=9)
    rows = {r["id"]: r for r in read_manifest(out).to_pylist()}
    sheet = page[page.index("<h2 id=examples>"):]
    for row in rows.values():
        if row["verdict"] in ("borderline", "reject"):
            block = sheet[sheet.index(f"<b>{row['id']}</b>"):]
            block = block[:block.index("</tr>")]
            checks = re.findall(r"<li>([^<]*)</li>", block[block.index("<ul class=fails>"):])
            expected = failed_checks(row, None, RoutingPolicy(overall_accept=0.95))
            assert checks and checks == [html.escape(c, quote=False) for c in expected]


def test_every_borderline_sample_is_listed(build):
    out, ids = build
    page = render_report(out, samples_per_verdict=1)  # the examples show one or two of them
    listed = page[page.index("<h2 id=borderline>"):page.index("<h2 id=examples>")]
    assert "Borderline samples (5)" in listed
    assert re.findall(r"<tr><td><code>([^<]+)</code>", listed) == ids
    for sample_id in ids:
        assert f'<a href="review/{sample_id}/">review/{sample_id}</a>' in listed
        assert (out / "review" / sample_id).is_dir()


def test_a_failing_score_never_reads_as_its_threshold(build):
    assert score_text(0.9199) == "0.919" and score_text(0.91999999, [0.92]) == "0.919"
    assert score_text(0.92, [0.92]) == "0.920" and score_text(1.0) == "1.000" and score_text(None) == "–"
    # a passing score, floored, would sit under a 4-decimal threshold: more digits
    assert score_text(0.92557, [0.9255]) == "0.9255" and score_text(0.92549, [0.9255]) == "0.925"
    out, ids = build
    page = render_report(out, samples_per_verdict=9)
    listed = page[page.index("<h2 id=borderline>"):page.index("<h2 id=examples>")]
    first = listed[listed.index(ids[0]):]
    assert "<td class=n>0.919</td>" in first[:first.index("</tr>")]
    # nowhere on the page does that sample's score read as a number at or above a threshold
    assert "0.920" not in page and "0.9199" not in page


def test_judge_against_the_defect_log(build, tmp_path):
    out, _ = build
    page = render_report(out, samples_per_verdict=1)
    faults = page[page.index("<h2 id=faults>"):page.index("<h2 id=borderline>")]
    cells = re.findall(r"<tr><td>([^<]+)</td><td class=n>([^<]+)</td><td class=n>([^<]+)</td></tr>", faults)
    figures = {name.split(" (")[0]: (value, of) for name, value, of in cells}
    # defective 0, 3 (borderline), 6 (accepted): 2 of 3 not accepted, none rejected;
    # clean 1, 2, 4 (borderline), 5, 7 (accepted), 8 (rejected): 1 of 6 rejected
    assert figures["judge recall"] == ("66.7%", "of 3")
    assert figures["defective samples rejected"] == ("0.0%", "of 3")
    assert figures["false-reject rate"] == ("16.7%", "of 6")
    assert figures["clean samples sent to a person"] == ("50.0%", "of 6")

    # no fault injected: no such section
    lines = [json.loads(line) for line in (out / DEFECTS).read_text().splitlines()]
    (out / DEFECTS).write_text("".join(json.dumps({**e, "defects": []}) + "\n" for e in lines))
    try:
        assert "<h2 id=faults>" not in render_report(out, samples_per_verdict=1)
    finally:
        (out / DEFECTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
