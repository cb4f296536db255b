"""CIE-Bench's reference figures: what the metrics give for the exact targets, the unchanged
source, uniform noise, and targets with half of each case's sub-edits skipped.

    python bench/cie_references.py [--out /tmp/cieref] [--count 400] [--resolution 512]

Builds the benchmark (unless OUT/bench exists), writes one predictions dir per reference and runs
`mcie eval --predictions` on each; prints one line per reference.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ciebench.cases import iter_bench  # noqa: E402
from pipeline.editors.procedural import apply_chain  # noqa: E402
from pipeline.sources.scene import Scene, render  # noqa: E402

MCIE = [sys.executable, "-m", "flows.cli"]
REFERENCES = ("reference", "source", "noise", "skip-half")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/cieref")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    root = Path(args.out)
    bench = root / "bench"
    if not (bench / "bench.json").exists():
        subprocess.run([*MCIE, "bench", "build", "--out", str(bench), "--count", str(args.count),
                        "--resolution", str(args.resolution)], check=True)
    dirs = {name: root / name for name in REFERENCES}
    for directory in dirs.values():
        directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    skipped = total = 0
    for case in iter_bench(bench):
        Image.fromarray(case.target).save(dirs["reference"] / f"{case.id}.png")
        Image.fromarray(case.source).save(dirs["source"] / f"{case.id}.png")
        noise = rng.integers(0, 256, case.source.shape, dtype=np.uint8)
        Image.fromarray(noise).save(dirs["noise"] / f"{case.id}.png")
        n = len(case.sub_edits)
        drop = set(rng.choice(n, n // 2, replace=False).tolist())
        skipped, total = skipped + len(drop), total + n
        kept = [None if i in drop else edit for i, edit in enumerate(case.sub_edits)]
        image, _ = render(apply_chain(Scene.from_dict(case.private["scene"]), kept))
        Image.fromarray(image).save(dirs["skip-half"] / f"{case.id}.png")
    print(f"skip-half drops {skipped / total:.1%} of the sub-edits", flush=True)
    for name, directory in dirs.items():
        result = subprocess.run([*MCIE, "eval", "--bench", str(bench), "--predictions", str(directory),
                                 "--out", str(root / f"eval-{name}")], capture_output=True, text=True)
        print(f"{name:10} {result.stdout.strip() or result.stderr.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
