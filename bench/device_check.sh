#!/usr/bin/env bash
# The open GPU checks in one run of at most ${BUDGET_S:-540} s on an H100/H200 (torch with CUDA
# installed), most important first, each step cut to the time left so a slow compile costs only
# the steps after it:
#   1. the trainer's own GPU path on a tiny DiT (bench/trainer_smoke.py --backbone qwen-image-edit,
#      ≤ 120 s): bf16, gradient checkpointing, the compiled flex_attention mask, train + resume +
#      EMA + train-cache, flex against the dense mask in bf16, and (issue 26) every background gate
#      and its projection trained (`gates_moved`);
#   2. issue 26 item 4: the inference peak of the `base` DiT presets from parameter counts
#      (bench/inference_memory.py, meta device, ≤ 60 s) → ${OUT:-out}/inference_memory.jsonl;
#   3. issue 28: the generative editor on the GPU (bench/editors.py --gpu, ≤ 180 s): an SD-1.5-size
#      random inpainting pipeline in fp16 at 512 px, batch 1/4/8/16, then the build path with the
#      busy share from CUDA events → ${OUT:-out}/editors.jsonl;
#   4. issue 19 (bench/dit_train.py, what is left, ≤ 300 s): MCIE-E1 on the 20B Qwen-Image-Edit
#      transformer, then FLUX.1 Kontext: samples/s and MFU against plain LoRA, peak memory;
#      its lines go to ${OUT:-out}/dit_train.jsonl;
#   5. if time is left: the UNet trainer smoke and issue 6's compiled UNet figures.
# Figures go to stdout and to ${OUT:-out}/*.jsonl, one JSON line each (see bench/train.py),
# with the 12 GPU kernels that take the most time (`top_ops`): what to optimise next.
# Where diffusers / webdataset are missing, put their wheels in .whl/ and they are installed to a
# scratch dir first (≈ 25 MB; a session passes `.whl` in the device tool's `carry`), made with
#   pip download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --platform any \
#     --only-binary=:all: -d .whl diffusers==0.42.* webdataset==1.0.* braceexpand importlib_metadata \
#     transformers==5.24.* accelerate==1.15.* safetensors tokenizers huggingface_hub tqdm regex \
#     peft==0.21.* psutil pyyaml
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-540}))
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mcie-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/mcie-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
device="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script with the tiny sizes
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if '$device' == 'cuda' else 'cpu')" || exit 1
# `limit N`: N seconds, or what is left of the budget if less (at least 1).
limit() { local left=$((deadline - SECONDS)); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
# `budgeted N CMD...`: on the device, CMD cut to `limit N`; the CPU dry run is bounded by its work
# (tiny sizes, a fixed number of steps) and never by the clock, so a loaded machine cannot fail it.
budgeted() { if [[ $device == cpu ]]; then "${@:2}"; else timeout "$(limit "$1")" "${@:2}"; fi; }
batch=(); [[ $device == cuda ]] && batch=(--batch 48)
bench() { budgeted "$1" python3 bench/train.py --device "$device" --skip loader --steps 10 --profile 12 \
            "${batch[@]}" "${@:2}" 2> >(tail -n 20 >&2) | tee -a "$out/device_check.jsonl"; }
smoke() {
  if python3 -c 'import transformers, accelerate, safetensors, peft' 2>/dev/null; then
    budgeted "$1" python3 bench/trainer_smoke.py "${@:2}" 2> >(tail -n 20 >&2) | tee -a "$out/device_check.jsonl"
  else
    echo '{"check": "trainer_smoke", "skipped": "transformers / accelerate / safetensors / peft not installed"}'
  fi
}
smoke 120 --backbone qwen-image-edit
budgeted 60 python3 bench/inference_memory.py 2> >(tail -n 20 >&2) | tee -a "$out/inference_memory.jsonl"
editors=(--cpu --count 4 --steps 2)  # the CPU dry run: tiny random pipelines at 64 px
[[ $device == cuda ]] && editors=(--gpu --count 32 --steps 20)
budgeted 180 python3 bench/editors.py "${editors[@]}" 2> >(tail -n 20 >&2) | tee -a "$out/editors.jsonl"
# Issue 19's figures: the benchmark stops itself 20 s before the step's limit and prints what it skipped.
dit=(--size tiny --budget-s 0)
[[ $device == cuda ]] && { left=$(limit 300); dit=(--size full --budget-s $(( left > 40 ? left - 20 : 20 ))); }
budgeted 300 python3 bench/dit_train.py --device "$device" "${dit[@]}" 2> >(tail -n 20 >&2) | tee -a "$out/dit_train.jsonl"
smoke 300
bench 270 --warmup 3 --models mcie-e1 --variants cl+tune+compile
bench 200 --warmup 3 --models ip2p --variants cl+tune+compile
