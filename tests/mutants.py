"""Do the tests catch the defects they are cited for? (a script, not a test module)

    .venv/bin/python tests/mutants.py [NAME ...]      # default: every mutant below

Each mutant is one textual change to the code — the defect a review found, put back — and the
tests cited for catching it. The working tree (uncommitted changes included) is copied into a
temporary directory, the change applied there (the main checkout is never touched), and the
cited tests run against it; the mutant is `caught` when they fail. First the cited tests run on
the unchanged copy: they must pass, or a "caught" would mean nothing. Prints one line per mutant
and exits 1 when any is missed, 2 on an unknown name, a change that no longer applies, or cited
tests that fail without a mutant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = {
    # issue 26 item 1: the clamped DiT gate that dies below 0
    "clamped-gate": Mutant(
        "the DiT background gate clamped to [0, 1] (it dies when its first step goes below 0)",
        "trainer/dit/processors.py",
        "weight = self.gate.to(out.dtype) *", "weight = self.gate.clamp(0, 1).to(out.dtype) *",
        ("tests/test_dit_gates.py",)),
    # issue 26 item 3 / 6: the Euler oracle that any schedule passed
    "mu-7": Mutant(
        "the resolution shift's mu forced to 7",
        "trainer/dit/model.py",
        'extra["mu"] = resolution_shift(sampler, tokens)', 'extra["mu"] = 7.0',
        ("tests/test_dit_sampling.py",)),
    "cubed-sigmas": Mutant(
        "the sampler's sigma grid cubed",
        "trainer/dit/model.py",
        "sigmas = np.linspace(1.0, 1.0 / steps, steps)", "sigmas = np.linspace(1.0, 1.0 / steps, steps) ** 3",
        ("tests/test_dit_sampling.py",)),
    "flipped-guidance": Mutant(
        "the true-CFG guidance sign flipped",
        "trainer/dit/model.py",
        "velocity = image_only + text_guidance * (full - image_only)",
        "velocity = image_only - text_guidance * (full - image_only)",
        ("tests/test_dit_sampling.py",)),
    "no-rescale": Mutant(
        "Qwen's per-token norm rescale left out",
        "trainer/dit/model.py",
        "velocity = rescale_to_conditional(velocity, full)", "velocity = velocity",
        ("tests/test_dit_sampling.py",)),
    "none-row-always": Mutant(
        "the 'none' row computed at image guidance 1.0",
        "trainer/dit/model.py",
        "rows = [0, 1]  # full, image only", "rows = [0, 1, 2]  # full, image only",
        ("tests/test_dit_sampling.py::test_released_defaults_run_only_the_rows_they_read",)),
    # issue 26 item 6: the LoRA-load test that passed with an all-zero LoRA file
    "zero-lora-file": Mutant(
        "the exported LoRA file written as zeros",
        "trainer/export.py",
        "save_file(tensors, str(directory / folder / LORA_WEIGHTS))",
        "save_file({k: v * 0 for k, v in tensors.items()}, str(directory / folder / LORA_WEIGHTS))",
        ("tests/test_dit_trainer.py::test_checkpoint_holds_what_was_trained_and_lora_loads_in_plain_diffusers",)),
    # issue 26 item 2: the released conditioning
    "qwen-no-dropped-prefix": Mutant(
        "Qwen-Image-Edit's template prefix kept (the pipeline drops its first tokens)",
        "trainer/dit/qwen_text.py",
        "template, dropped = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx",
        "template, dropped = pipe.prompt_template_encode, 0",
        ("tests/test_dit_released_qwen.py::test_text_tokens_are_the_pipelines_prompt_embeds",)),
    "kontext-pooled-zero": Mutant(
        "FLUX.1 Kontext's pooled vector not CLIP's",
        "trainer/dit/kontext_text.py",
        "        return states, pooled\n", "        return states, pooled * 0\n",
        ("tests/test_dit_released_kontext.py::test_text_tokens_and_pooled_are_the_pipelines",
         "tests/test_dit_released_kontext.py::test_sample_with_mcie_neutral_is_the_pipeline")),
    # issue 27: the near-duplicate search, vectorised
    "dedup-chains": Mutant(
        "a duplicate mapped to an earlier duplicate (not only to originals)",
        "pipeline/sources/dedup.py",
        "for i in neighbours.get(j, ()) if original[i]), None)",
        "for i in neighbours.get(j, ())), None)",
        ("tests/test_sources.py::test_find_duplicates_equals_a_brute_force_search_on_many_near_copies",)),
    "dedup-15-bit-flips": Mutant(
        "a band's top bit never flipped when neighbours are gathered",
        "pipeline/sources/dedup.py",
        "[1 << bit for bit in range(16)]", "[1 << bit for bit in range(15)]",
        ("tests/test_sources.py::test_find_duplicates_equals_a_brute_force_search_on_many_near_copies",)),
    "dedup-run-gap": Mutant(
        "the last entry of each run of candidates never looked up",
        "pipeline/sources/dedup.py",
        "for start, stop in zip(edges[:-1].tolist(), edges[1:].tolist()):",
        "for start, stop in zip(edges[:-1].tolist(), (edges[1:] - 1).tolist()):",
        ("tests/test_sources.py::test_find_duplicates_equals_a_brute_force_search_on_many_near_copies",)),
}


def copy_tree(into: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored), and the venv linked."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)
    (into / ".venv").symlink_to(ROOT / ".venv")


def pytest(tree: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(tree / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=tree, env=env, capture_output=True, text=True)


def control(tests: tuple[str, ...]) -> bool:
    with tempfile.TemporaryDirectory(prefix="mutant-none-") as scratch:
        copy_tree(Path(scratch))
        proc = pytest(Path(scratch), tests)
        print(f"{'passes' if proc.returncode == 0 else 'FAILS'}  without a mutant: {len(tests)} cited tests",
              flush=True)
        return proc.returncode == 0


def run(name: str, mutant: Mutant) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as scratch:
        tree = Path(scratch)
        copy_tree(tree)
        target = tree / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            print(f"{name}: the change no longer applies ({mutant.path} holds {text.count(mutant.old)} copies)")
            sys.exit(2)
        target.write_text(text.replace(mutant.old, mutant.new))
        start = time.monotonic()
        proc = pytest(tree, mutant.tests)
        caught = proc.returncode == 1  # tests failed (not: collection error, usage error)
        failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        print(f"{'caught' if caught else 'MISSED'}  {name}: {mutant.what} — {' '.join(mutant.tests)} "
              f"({time.monotonic() - start:.0f} s){': ' + failed[0] if failed else ''}", flush=True)
        return caught


def main() -> int:
    names = sys.argv[1:] or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        print(f"unknown mutant {unknown[0]!r}; known: {', '.join(MUTANTS)}")
        return 2
    if not control(tuple(dict.fromkeys(test for name in names for test in MUTANTS[name].tests))):
        return 2
    missed = [name for name in names if not run(name, MUTANTS[name])]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
