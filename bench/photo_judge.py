"""The pixel judge on fault-injected PHOTO pairs, over several seeds: a thin wrapper of
`mcie judge-bench --source folder --editor photo`.

Copies scikit-image's bundled colour photographs (located at run time, nothing is downloaded) into
a temporary folder and runs `pipeline.judges.bench.judge_bench` on it once per seed (the build's
own front half: folder source -> classical grounder -> inventory composer -> photo editor with the
defect rate -> pixel judge -> routing), `--count` pairs per seed (every photo × enough edits per
image). Prints one JSON line per seed, then a Markdown table.

    .venv/bin/python bench/photo_judge.py --seeds 0 1 2 3 4 --count 300

One seed by hand: mcie judge-bench --source folder --source-path DIR --editor photo
    --edits-per-image 34 --count 300 --defect-rate 0.25 --seed 0
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.judges.bench import judge_bench  # noqa: E402

# motorcycle_right.png is left out: the dedup quarantines it as a near-duplicate of the left one.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
STAGES = ("read", "ground", "compose", "edit", "judge", "route", "total")


def photo_folder(dest: Path) -> int:
    """Copy the colour sample photos of the installed scikit-image into `dest`; their number."""
    data = importlib.resources.files("skimage") / "data"
    copied = 0
    for name in PHOTOS:
        path = Path(str(data / name))
        if path.is_file():
            shutil.copyfile(path, dest / name)
            copied += 1
    if not copied:
        raise SystemExit(f"no sample photos in {data}")
    return copied


def table(reports: list[dict]) -> str:
    head = ("| seed | pairs | clean / defective | recall | false rejects | borderline all / clean | "
            "ms per pair: " + " / ".join(STAGES) + " |")
    lines = [head, "|" + "---|" * 7]
    for r in reports:
        ms = " / ".join(f"{r['ms_per_pair'][s]:.1f}" for s in STAGES)
        lines.append(f"| {r['seed']} | {r['scored']} | {r['clean']} / {r['defective']} | "
                     f"{r['defect_recall']:.4f} | {r['false_reject_rate']:.4f} | "
                     f"{r['borderline_rate']:.4f} / {r['false_borderline_rate']:.4f} | {ms} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--count", type=int, default=300, help="pairs per seed")
    parser.add_argument("--defect-rate", type=float, default=0.25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--misses", action="store_true", help="print the missed pairs too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    reports = []
    with tempfile.TemporaryDirectory(prefix="photo-judge-") as tmp:
        photos = photo_folder(Path(tmp))
        for seed in args.seeds:
            report = judge_bench(args.count, args.defect_rate, seed=seed,
                                 resolution=args.resolution, source="folder",
                                 source_options={"path": tmp}, editor="photo",
                                 edits_per_image=math.ceil(args.count / photos), keep_misses=20)
            misses = report.pop("misses")
            print(json.dumps({k: report[k] for k in (
                "seed", "scored", "clean", "defective", "defect_recall", "false_reject_rate",
                "false_borderline_rate", "borderline_rate", "errors", "ms_per_pair")}), flush=True)
            if args.misses:
                print(json.dumps({"per_defect_type": report["per_defect_type"],
                                  "per_edit_type": report["per_edit_type"]}, indent=1))
                for miss in misses:
                    print(json.dumps(miss))
            reports.append(report)
    print(table(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
