"""Images/s of the generative editors through their batched path, and the share of a build's wall
time the model is busy.

Both modes run the same two measurements (`measure`), only the model and sizes differ:
(a) the editor alone, batched: one unit of samples of one photo (so one working size) grounded and
    composed by the build's own stages, then edited with `batch_size` 1/4/8/16 (the lock-step
    path of `GenerativeEditor.__call__`): model frames/s and samples/s;
(b) a build: `UnitPipeline.run` over the units of a photo folder (decoding, classical grounding,
    composing, the batched editor, the pixel judge, routing and shard writing, as a build worker
    runs them) with the largest batch: samples/s and the busy share = time inside the diffusers
    pipeline calls (CUDA events on a GPU, the wall clock on the CPU) / build wall time.
CPU dry run (tiny random pipelines of tests/model_fixtures.py, 64 px; runs here):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/editors.py --cpu [--count 8] [--steps 2]
GPU (an SD-1.5-size inpainting pipeline, UNet 860 M params with in_channels 9, the SD VAE and a
CLIP-L-size text encoder, all random init, float16, 512 px):
    python bench/editors.py --gpu [--count 64] [--steps 20]
Simulated device (`pipeline.model_actors.SimulatedDevice`: MS_PER_BATCH slept per batch, one
batch at a time across processes, seeded colour frames) behind the REAL CPU stages on real photos,
built through Ray (`flows.execute.run_units`) in both designs: "in-actor" (each unit worker holds
the model: today's `--num-gpus` per worker; 1 worker = one GPU with `--num-gpus 1`, 2 workers =
two model copies) and "model-actor" (CPU unit workers, one model actor; also with 3 workers, one
more than the cores: a worker waiting for its batch uses no CPU):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/editors.py --simulate 100 300 1000 [--count 24]
    [--resolution 96]
Figures are taken over the device's own window (first batch's arrival to the last batch's end, so
actor start-up is out): busy share of that wall time, pairs/s, queue depth seen by each arriving
batch (mean/max), and, once, the CPU stages alone (MS_PER_BATCH 0, one process, no Ray) and the
device's pairs/s at each MS_PER_BATCH: the crossover is where the CPU's pairs/s exceeds it.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def make_config(photos: Path, options: dict, count: int, resolution: int, unit: int,
                edits_per_image: int = 1):
    from pipeline.config import BuildConfig

    return BuildConfig(count=count, seed=1, resolution=resolution, shard_size=unit, source="folder",
                       source_options={"path": str(photos)}, editor="inpaint",
                       editor_options=options, edits_per_image=edits_per_image, defect_rate=0.0,
                       min_edits=2, max_edits=3)


class BusyClock:
    """Wraps the editor's diffusers pipeline: seconds spent inside its calls, frames made."""

    def __init__(self, pipe, cuda: bool):
        self.pipe, self.cuda, self.seconds, self.frames = pipe, cuda, 0.0, 0

    def __call__(self, **kwargs):
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        started = time.perf_counter()
        result = self.pipe(**kwargs)
        if self.cuda:
            end.record()
            end.synchronize()  # the pipeline returns numpy: it has synchronised already
            self.seconds += start.elapsed_time(end) / 1000
        else:
            self.seconds += time.perf_counter() - started
        self.frames += len(kwargs["prompt"])
        return result


def clocked(editor, cuda: bool) -> BusyClock:
    editor.model._pipe = BusyClock(editor.model.pipe, cuda)  # loads the model first
    return editor.model._pipe


def editor_alone(tmp: Path, photo: Path, options: dict, count: int, px: int, batches, cuda: bool):
    """(a): one unit of `count` samples of one photo, edited with each batch size."""
    import copy

    from flows.plan import prepare_build
    from pipeline.dataset.source_index import read_index
    from pipeline.unit import front_stages, make_source, read_sample

    one = tmp / "one-photo"
    one.mkdir()
    (one / photo.name).write_bytes(photo.read_bytes())
    for batch in batches:
        config = make_config(one, {**options, "batch_size": batch}, count, px, count, count)
        out = tmp / f"alone-{batch}"
        prepare_build(out, config)
        source, index = make_source(config), read_index(out)
        samples = [read_sample(source, config, index, n) for n in range(count)]
        grounder, composer, editor = front_stages(config)
        composer(grounder(samples))
        clock = clocked(editor, cuda)
        editor([copy.deepcopy(s) for s in samples[:batch]])  # warm-up (kernels, allocator)
        clock.seconds, clock.frames = 0.0, 0
        started = time.perf_counter()
        editor(samples)
        seconds = time.perf_counter() - started
        edited = sum(s.target is not None for s in samples)
        print(json.dumps({"bench": "editor", "device": options["device"], "px": px,
                          "steps": options["steps"], "batch_size": batch, "samples": edited,
                          "frames": clock.frames, "seconds": round(seconds, 2),
                          "frames_per_s": round(clock.frames / seconds, 3),
                          "samples_per_s": round(edited / seconds, 3),
                          "busy_share": round(clock.seconds / seconds, 3)}), flush=True)


def build(tmp: Path, photos: Path, options: dict, count: int, px: int, unit: int, cuda: bool):
    """(b): the units of a build as a worker runs them, shards written."""
    from flows.plan import prepare_build
    from pipeline.unit import UnitPipeline

    images = sum(1 for p in photos.iterdir() if p.is_file())
    config = make_config(photos, options, count, px, unit, max(1, -(-count // images)))
    out = tmp / "build"
    prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    (editor,) = [s for s in pipeline.stages if s.name == "edit"]
    clock = clocked(editor, cuda)
    started = time.perf_counter()
    stats = [pipeline.run(number) for number in range(config.num_units(pipeline.total))]
    seconds = time.perf_counter() - started
    verdicts = sum((s.verdicts for s in stats), Counter())
    print(json.dumps({"bench": "build", "device": options["device"], "px": px,
                      "steps": options["steps"], "batch_size": options["batch_size"],
                      "unit": unit, "samples": pipeline.total, "frames": clock.frames,
                      "seconds": round(seconds, 2),
                      "samples_per_s": round(pipeline.total / seconds, 3),
                      "busy_share": round(clock.seconds / seconds, 3),
                      "verdicts": dict(sorted(verdicts.items()))}), flush=True)


def cpu(args) -> None:
    import torch

    from model_fixtures import tiny_inpaint
    from photo_fixtures import photo_folder

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = photo_folder(tmp / "photos")
        options = {"path": str(tiny_inpaint(tmp / "m" / "inpaint")), "steps": args.steps,
                   "max_side": args.resolution, "device": "cpu", "dtype": "float32"}
        editor_alone(tmp, photos / "chelsea.png", options, args.count, args.resolution,
                     (1, 4, 8, 16), cuda=False)
        build(tmp, photos, {**options, "batch_size": 16}, args.count, args.resolution,
              max(args.count // 2, 1), cuda=False)


def sd15_inpaint(path: Path, dtype) -> None:
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from model_fixtures import byte_tokenizer

    torch.manual_seed(0)
    tokenizer, vocab = byte_tokenizer(path.parent / "tok")
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4,
                                cross_attention_dim=768, attention_head_dim=8)  # SD-1.5 layout
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, bos_token_id=vocab - 2,
                                        eos_token_id=vocab - 1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                          scheduler=scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def gpu(args) -> None:
    import torch

    from photo_fixtures import photo_folder

    if not torch.cuda.is_available():
        sys.exit("bench/editors.py --gpu: no CUDA device here (run --cpu, or on a GPU machine)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "sd15-inpaint-random"
        sd15_inpaint(model, torch.float16)
        photos = photo_folder(tmp / "photos")
        options = {"path": str(model), "steps": args.steps, "max_side": 512, "device": "cuda",
                   "dtype": "float16"}
        editor_alone(tmp, photos / "astronaut.png", options, args.count, 512, (1, 4, 8, 16),
                     cuda=True)
        build(tmp, photos, {**options, "batch_size": 16}, args.count, 512, 32, cuda=True)


SIMULATE_PHOTOS = ("rocket", "motorcycle_left", "coffee")  # things classical grounding names at 64 px


def simulate(args) -> None:
    from flows.execute import run_units
    from flows.plan import prepare_build
    from flows.ray_runtime import start_ray, stop_ray
    from photo_fixtures import photo_folder
    from pipeline.model_actors import SimulatedDevice, device_figures, device_log
    from pipeline.unit import UnitPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = photo_folder(tmp / "photos", SIMULATE_PHOTOS)
        images = sum(1 for p in photos.iterdir() if p.is_file())

        def config_for(device: Path):
            options = {"path": str(device), "steps": 1, "max_side": args.resolution,
                       "batch_size": 16}
            return make_config(photos, options, args.count, args.resolution, args.unit,
                               max(1, -(-args.count // images)))

        # the CPU stages alone: decode, ground, compose, edit (no device time), judge, write
        config = config_for(SimulatedDevice.save(tmp / "cpu-device", 0))
        prepare_build(tmp / "cpu", config)
        pipeline = UnitPipeline(config, tmp / "cpu")
        started = time.perf_counter()
        for unit in range(config.num_units(pipeline.total)):
            pipeline.run(unit)
        cpu_seconds = time.perf_counter() - started
        batches = len(device_log(tmp / "cpu-device"))
        print(json.dumps({"bench": "cpu-stages", "px": args.resolution, "samples": pipeline.total,
                          "unit": args.unit, "device_batches": batches,
                          "seconds": round(cpu_seconds, 2),
                          "pairs_per_s_one_process": round(pipeline.total / cpu_seconds, 3),
                          "cpu_seconds_per_batch": round(cpu_seconds / batches, 4)}), flush=True)
        # 1 and 2 unit workers for both designs; the model-actor design also with one worker more
        # than the 2 cores: a worker waiting for its batch uses no CPU, so cores + 1 workers keep
        # both the cores and the device busy (two in lock-step leave the device idle whenever
        # both are on their CPU stages at once)
        start_ray(None, 3)
        try:
            for ms in args.simulate:
                device_pairs = pipeline.total / (batches * ms / 1000) if ms else None
                for design, worker_counts in (("in-actor", (1, 2)), ("model-actor", (1, 2, 3))):
                    for workers in worker_counts:
                        device = SimulatedDevice.save(tmp / f"device-{ms}-{design}-{workers}", ms)
                        config, out = config_for(device), tmp / f"out-{ms}-{design}-{workers}"
                        prepare_build(out, config)
                        units = list(range(config.num_units(pipeline.total)))
                        result = run_units(config, out, units, workers,
                                           model_actors=design == "model-actor")
                        rows = device_log(device)
                        since, until = rows[0][0], max(r[2] for r in rows)
                        figures = device_figures(rows, since, until)
                        if design == "model-actor":  # queued in the actor, before the device
                            (served,) = result.models
                            figures["queue_depth_mean"] = served["queue_depth_mean"]
                            figures["queue_depth_max"] = served["queue_depth_max"]
                        print(json.dumps({
                            "bench": "simulated", "ms_per_batch": ms, "design": design,
                            "workers": workers, "samples": result.stats.samples,
                            "batches": figures["batches"], "seconds": round(until - since, 2),
                            "busy_share": round(figures["busy_share"], 3),
                            "pairs_per_s": round(result.stats.samples / (until - since), 3),
                            "device_pairs_per_s": device_pairs and round(device_pairs, 3),
                            "cpu_pairs_per_s_one_process": round(pipeline.total / cpu_seconds, 3),
                            "queue_depth_mean": round(figures["queue_depth_mean"], 2),
                            "queue_depth_max": figures["queue_depth_max"]}), flush=True)
        finally:
            stop_ray()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--simulate", type=float, nargs="+", metavar="MS_PER_BATCH",
                      help="a simulated device with this service time per batch (several: a sweep)")
    parser.add_argument("--count", type=int, default=None, help="6; --simulate: 24")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="64; --simulate: 96")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unit", type=int, default=4, help="--simulate: samples per unit")
    args = parser.parse_args()
    if args.simulate and (min(args.simulate) < 0 or max(args.simulate) > 60000):
        parser.error("--simulate: MS_PER_BATCH must be within 0..60000")
    if args.simulate:
        args.count, args.resolution = args.count or 24, args.resolution or 96
        return simulate(args)
    args.count, args.resolution = args.count or 6, args.resolution or 64
    if args.steps is None:
        args.steps = 2 if args.cpu else 20
    cpu(args) if args.cpu else gpu(args)


if __name__ == "__main__":
    main()
