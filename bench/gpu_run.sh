#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no network there): wheels for what
# its image lacks travel in .whl/ (open_clip_torch, ftfy, wcwidth: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl ...`). Usage: bench/gpu_run.sh smoke|graphs|main OUTDIR [SYNTH_ITERS] [JOBS] [LIMIT_S]
set -uo pipefail
mode=$1 out=$2 synth=${3:-200} jobs=${4:-14} limit=${5:-400}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
if [ "$mode" = graphs ]; then
  # Issue 17 on a GPU: the graphed step against the eager one (test), unit step ratios with
  # CUDA graphs off and on, and a real-size job per model with the reference projection.
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/core/test_step.py 2>&1 | tail -n 5
  for g in 0 1; do
    D4C_CUDA_GRAPHS=$g timeout 150 python3 bench/speed.py --sections recon,recon-real \
      --device cuda --ratio-iters 200 --real-ratio-iters 60 | tee "$out/recon-graphs$g.md"
  done
  D4C_CUDA_GRAPHS=1 timeout 240 python3 bench/real_size.py --device cuda --images 128 \
    --recon-iters 20 --step-reps 50 --json "$out/real-size-gpu.json" | tee "$out/real-size-gpu.md"
  exit
fi
if [ "$mode" = smoke ]; then
  time python3 bench/accuracy.py --out "$out/smoke.jsonl" --methods d4c,real --bits w4a8 \
    --seeds 0 --synth-iters 50 --device cuda --jobs 4 --threads 1 | tee "$out/smoke.md"
  exit
fi
# 1. Speed: reconstruction cost ratio and synthesis step ratio on the GPU, RN50 / ViT-B-32
#    synthesis throughput (random init).
timeout 150 python3 bench/speed.py --sections recon,synth,synth-real --device cuda \
  --ratio-iters 200 --synth-ratio-reps 30 --synth-real-iters 3 | tee "$out/speed-gpu.md"
# 2. The accuracy table: synthesis methods first, then real and noise (rows are appended as
#    each group finishes, so a run cut by the limit still returns what it measured).
timeout "$limit" python3 bench/accuracy.py --out "$out/accuracy-gpu.jsonl" \
  --methods d4c,d4c:pgsi,d4c:pgsi+scg,d4c:pgsi+pae,bns,pse,real,noise \
  --synth-iters "$synth" --device cuda --jobs "$jobs" --threads 1 > "$out/accuracy-gpu.md" \
  2> "$out/accuracy-gpu.log"
echo "accuracy exit $?"
tail -n 30 "$out/accuracy-gpu.log"
python3 bench/accuracy.py --out "$out/accuracy-gpu.jsonl" --synth-iters "$synth" --table \
  --device cuda > "$out/accuracy-gpu.md"
cat "$out/accuracy-gpu.md"
