#!/usr/bin/env bash
# The prepared GPU run: seconds per DOODL iteration and torch.cuda.max_memory_allocated above the weights,
# random weights of the real architectures (no download). Parts, each with its own time limit:
#   sd     SD 1.5 at 512 px (the three gradient modes) and SDXL base at 1024 px (reversible), 50 EDICT
#          steps, float16: 5.5 minutes on one H200 (2026-12-04) with the weights built, about 2 more to build;
#   flux   FLUX.1-dev at 1024 px, 28 steps (reversible), and FLUX.1-schnell, 4 steps (its plain chain),
#          bfloat16: not run yet (its budget: 9 minutes, the 12-billion-parameter weights built on the GPU).
#   speed  SD 1.5 at 512 px, float16: ms per UNet call of diffusers' own (the UNet alone, its pipeline)
#          against DOODL's (a sample, an iteration), eager and compiled (CUDA graphs), in one process, and
#          a profile of one step (benchmarks/speed.py): not run yet (its budget: 9.5 minutes, the weights
#          built in about one).
# A device session has 15 minutes: run one part per call.
#
#   benchmarks/gpu.sh --pack               # here, once: pack the pure-Python packages the GPU image lacks
#   benchmarks/gpu.sh [PART] [RESULTS]     # on the GPU machine: PART sd (default), flux or speed;
#                                          # results to RESULTS (default benchmarks/results)
#   benchmarks/gpu.sh --dry-run            # here, on the CPU: the same paths with tiny models, in seconds
#
# The GPU machine's image has torch, transformers and accelerate but neither diffusers nor open_clip, and
# nothing can be installed there: --pack copies them (and what they import that the image may lack or hold
# in another version: huggingface_hub, ftfy, wcwidth) from this machine's .venv into .whl/gpu-deps.tar.gz
# (.whl/ is git-ignored; carry it: `run(command="benchmarks/gpu.sh $OUT", carry=[".whl"])`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1

case "${1:-}" in
--pack)
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p .whl
    tar czf .whl/gpu-deps.tar.gz --exclude=__pycache__ -C "$site" \
        diffusers open_clip ftfy wcwidth
    ls -l .whl/gpu-deps.tar.gz
    exit 0
    ;;
--dry-run)
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    for arch in tiny tiny-sdxl tiny-sd3 tiny-flux; do
        "$PY" -m benchmarks.memory --arch "$arch" --timing --device cpu --steps 3 --modes reversible \
            --tiny-size 8 --out "$out"
    done
    for arch in tiny tiny-sdxl; do
        "$PY" -m benchmarks.speed --quick --arch "$arch" --out "$out"
    done
    ls "$out"
    exit 0
    ;;
esac

part=sd
if [[ "${1:-}" == sd || "${1:-}" == flux || "${1:-}" == speed ]]; then part=$1; shift; fi
results=${1:-benchmarks/results}
mkdir -p "$results"
if [[ -f .whl/gpu-deps.tar.gz ]] && ! "$PY" -c 'import diffusers, open_clip' 2>/dev/null; then
    deps=$(mktemp -d)
    tar xzf .whl/gpu-deps.tar.gz -C "$deps"
    export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import torch, diffusers, transformers, open_clip
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "open_clip", open_clip.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
models=${MODELS:-/tmp/doodl-gpu-models}  # the random models, built once (SDXL: 7 GB in float16)
# 16 CPU threads: building the random weights (once per architecture) is CPU work.
if [[ $part == sd ]]; then
    timeout 240 "$PY" -m benchmarks.memory --arch sd15 --device cuda --steps 50 --threads 16 \
        --models "$models" --out "$results" || echo "sd15: exit $?"
    timeout 330 "$PY" -m benchmarks.memory --arch sdxl --device cuda --size 1024 --steps 50 --modes reversible \
        --threads 16 --models "$models" --out "$results" || echo "sdxl: exit $?"
elif [[ $part == speed ]]; then
    timeout 570 "$PY" -m benchmarks.speed --arch sd15 --device cuda --steps 10 --threads 16 \
        --models "$models" --out "$results" || echo "speed: exit $?"
else
    timeout 390 "$PY" -m benchmarks.memory --arch flux --device cuda --size 1024 --steps 28 --modes reversible \
        --threads 16 --models "$models" --out "$results" || echo "flux: exit $?"
    timeout 150 "$PY" -m benchmarks.memory --arch flux-schnell --device cuda --size 1024 --steps 4 \
        --modes reversible --threads 16 --models "$models" --out "$results" || echo "flux-schnell: exit $?"
fi
ls -l "$results"/speed-*-cuda.*
