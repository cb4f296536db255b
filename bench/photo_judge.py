"""The pixel judge on fault-injected PHOTO pairs: recall, false rejects, borderline, speed.

Builds pairs in-process from scikit-image's bundled photographs (located at run time, nothing is
downloaded): decode -> short side RESOLUTION -> ClassicalGrounder -> InventoryComposer ->
PhotoEditor(defect_rate) -> JudgeStage(pixel) -> RouteStage(the judge's policy), and scores the
verdicts against the editor's hidden defect log with `pipeline.judges.bench.VerdictScore` (the
`mcie judge-bench` logic). Prints one JSON line per seed and a summary.

    .venv/bin/python bench/photo_judge.py --seeds 0 1 2 --count 300 --resolution 512
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.compose.photo import InventoryComposer  # noqa: E402
from pipeline.editors.photo import PhotoEditor  # noqa: E402
from pipeline.grounders.classical import ClassicalGrounder  # noqa: E402
from pipeline.judges.base import JudgeStage, make_judge  # noqa: E402
from pipeline.judges.bench import VerdictScore  # noqa: E402
from pipeline.record import EditSample, sample_id  # noqa: E402
from pipeline.routing import RouteStage, RoutingPolicy  # noqa: E402
from pipeline.sources.decode import decode_image, fit_resolution  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
BATCH = 8  # the composer lends donors within a batch


def load_photos(resolution: int) -> dict[str, object]:
    data = importlib.resources.files("skimage") / "data"
    photos = {}
    for name in PHOTOS:
        path = Path(str(data / name))
        if path.is_file():
            photos[name] = fit_resolution(decode_image(path.read_bytes()).image, resolution)
    if not photos:
        raise SystemExit(f"no sample photos in {data}")
    return photos


def run_seed(photos: dict, seed: int, count: int, defect_rate: float) -> dict:
    grounder = ClassicalGrounder()
    composer = InventoryComposer()
    editor = PhotoEditor(defect_rate=defect_rate)
    judge = make_judge("pixel")
    judging, routing = JudgeStage(judge), RouteStage(RoutingPolicy.for_judge(judge))
    keys = sorted(photos)
    score = VerdictScore(keep_misses=20)
    seconds = {"ground": 0.0, "compose": 0.0, "edit": 0.0, "judge": 0.0, "route": 0.0}
    pairs = 0
    for start in range(0, count, BATCH):
        batch = []
        for index in range(start, min(count, start + BATCH)):
            key = keys[index % len(keys)]
            edit_index = index // len(keys)
            batch.append(EditSample(id=sample_id(seed, key, edit_index), index=index, seed=seed,
                                    source=photos[key].copy(), source_key=key,
                                    edit_index=edit_index))
        for name, stage in (("ground", grounder), ("compose", composer), ("edit", editor),
                            ("judge", judging), ("route", routing)):
            t0 = time.perf_counter()
            stage(batch)
            seconds[name] += time.perf_counter() - t0
        pairs += sum(not s.failed for s in batch)
        score.add(batch)
    report = score.report()
    report["seed"] = seed
    report["pairs"] = pairs
    report["ms_per_pair"] = {k: round(1000 * v / max(pairs, 1), 2) for k, v in seconds.items()}
    report["ms_per_pair"]["total"] = round(1000 * sum(seconds.values()) / max(pairs, 1), 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--count", type=int, default=300, help="pairs per seed")
    parser.add_argument("--defect-rate", type=float, default=0.25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--misses", action="store_true", help="print the missed pairs too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    photos = load_photos(args.resolution)
    for seed in args.seeds:
        report = run_seed(photos, seed, args.count, args.defect_rate)
        misses = report.pop("misses")
        line = {k: report[k] for k in ("seed", "pairs", "clean", "defective", "defect_recall",
                                        "false_reject_rate", "false_borderline_rate",
                                        "borderline_rate", "errors", "ms_per_pair")}
        print(json.dumps(line))
        if args.misses:
            print(json.dumps({"per_defect_type": report["per_defect_type"],
                              "per_edit_type": report["per_edit_type"]}, indent=1))
            for miss in misses:
                print(json.dumps(miss))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
