"""Issue 25, item 1: what a reviewer's annotation hands back is decoded against the sample, never
at the size it declares. A region of another size, a sub-instruction the sample does not have or
a damaged RLE is a `MalformedCorrection` (the pull leaves that sample undecided, with one
warning; tests/test_annotation_server.py runs it against the real server), and a 5.3 MB brush
answer declaring an 8000 x 8000 image costs a bounded amount of memory: a ceiling in a child
process (`RLIMIT_AS`), never a timer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from annotation import brush
from annotation.corrections import MalformedCorrection, apply_proposal, read_proposal
from shard_samples import finished_sample

ROOT = Path(__file__).resolve().parents[1]
HUGE = 8_000  # 8000 x 8000 x 4 values: within brush.MAX_VALUES, so only the sample can refuse it


def region(label: int, rle: list[int], height: int, width: int) -> dict:
    return {"from_name": "regions", "to_name": "target", "type": "brushlabels",
            "original_height": height, "original_width": width,
            "value": {"format": "rle", "rle": rle, "brushlabels": [f"Region {label}"]}}


def huge_rle(size_bytes: int) -> list[int]:
    """A brush RLE whose header declares HUGE x HUGE x 4 values, padded to `size_bytes`."""
    count = HUGE * HUGE * 4
    header = [(count >> s) & 255 for s in (24, 16, 8, 0)]
    return header + [0x3F] * (size_bytes - len(header))


def test_a_region_declaring_a_huge_image_is_refused_before_decoding():
    sample = finished_sample(0, "borderline", edits=2)
    proposal = read_proposal([region(1, huge_rle(4096), HUGE, HUGE)], 2)  # read, not decoded
    with pytest.raises(MalformedCorrection, match=f"declared {HUGE}x{HUGE}, the image is 64x64"):
        apply_proposal(sample, proposal, 7)


def test_a_region_of_another_size_and_an_index_past_the_sample_are_malformed():
    sample = finished_sample(0, "borderline", edits=2)
    small = np.zeros((32, 32), bool)
    small[4:9, 4:9] = True
    with pytest.raises(MalformedCorrection, match="declared 32x32, the image is 64x64"):
        apply_proposal(sample, read_proposal([region(1, brush.encode(small), 32, 32)], 2), 1)
    text = {"from_name": "sub_6_edit", "to_name": "target", "type": "textarea", "value": {"text": ["x"]}}
    with pytest.raises(MalformedCorrection, match="sub-instruction 6, the sample has 2"):
        apply_proposal(sample, read_proposal([text], 8), 1)
    lying = brush.encode(small)  # a 32x32 stream declared 64x64: the count does not match
    with pytest.raises(MalformedCorrection, match="unreadable"):
        apply_proposal(sample, read_proposal([region(2, lying, 64, 64)], 2), 1)
    assert sample.human is None and sample.sub_edits[0].text == "do edit 0"  # nothing applied


def test_a_good_region_still_applies():
    sample = finished_sample(0, "borderline", edits=2)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:30] = True
    applied = apply_proposal(sample, read_proposal([region(2, brush.encode(mask), 64, 64)], 2), 3)
    assert applied.changes == [("add", "region")] and np.array_equal(sample.sub_edits[1].mask, mask)


CHILD = textwrap.dedent("""
    import resource, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from annotation.corrections import MalformedCorrection, apply_proposal, read_proposal
    from shard_samples import finished_sample
    from test_bounds_review import HUGE, huge_rle, region
    answer = [region(1, huge_rle(5_300_000), HUGE, HUGE)]  # a 5.3 MB answer, as Label Studio sends it
    sample = finished_sample(0, "borderline", edits=2)
    resource.setrlimit(resource.RLIMIT_AS, ({ceiling}, {ceiling}))
    try:
        apply_proposal(sample, read_proposal(answer, 2), 1)
    except MalformedCorrection as exc:
        print("refused:", exc)
""")


def test_a_5mb_brush_answer_declaring_a_huge_size_stays_under_the_memory_ceiling():
    ceiling = 1536 * 1024 * 1024  # 1.5 GiB of address space for the whole process (issue 25)
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), ceiling=ceiling)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"refused: corrected region 1 is declared {HUGE}x{HUGE}" in done.stdout, done.stdout
