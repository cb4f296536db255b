#!/usr/bin/env bash
# Issue 6's GPU measurements in one run of at most ≈ 9 min on an H100 (torch with CUDA installed):
#   0. the trainer's own GPU path, train-cache included (bench/trainer_smoke.py, ≤ 2 min), where
#      transformers and accelerate are importable;
#   1. both denoisers eager and with channels-last + cudnn benchmark + cuDNN attention (≈ 1 min);
#   2. MCIE-E1 with channels-last + cudnn benchmark + torch.compile, what `base` trains with (≈ 3 min);
#   3. the same with cuDNN attention preferred (≈ 3 min).
# Figures go to stdout and to ${OUT:-out}/device_check.jsonl, one JSON line each (see bench/train.py),
# with the 12 GPU kernels that take the most time (`top_ops`): what to optimise next.
# Where diffusers / webdataset are missing, put their wheels in .whl/ and they are installed to a
# scratch dir first (≈ 25 MB; a session passes `.whl` in the device tool's `carry`), made with
#   pip download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --platform any \
#     --only-binary=:all: -d .whl diffusers==0.42.* webdataset==1.0.* braceexpand importlib_metadata \
#     transformers==5.24.* accelerate==1.15.* safetensors tokenizers huggingface_hub tqdm regex
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mcie-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/mcie-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
device="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script with the tiny sizes
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if '$device' == 'cuda' else 'cpu')" || exit 1
if python3 -c 'import transformers, accelerate, safetensors' 2>/dev/null; then
  timeout 120 python3 bench/trainer_smoke.py 2> >(tail -n 20 >&2) | tee -a "$out/device_check.jsonl"
else
  echo '{"check": "trainer_smoke", "skipped": "transformers / accelerate / safetensors not installed"}'
fi
bench() { timeout "$1" python3 bench/train.py --device "$device" --skip loader --steps 10 --profile 12 "${@:2}" \
            2> >(tail -n 20 >&2) | tee -a "$out/device_check.jsonl"; }
bench 110 --warmup 2 --variants eager,cl+tune+cudnn_attn
bench 170 --warmup 3 --models mcie-e1 --variants cl+tune+compile
bench 170 --warmup 3 --models mcie-e1 --variants cl+tune+cudnn_attn+compile
