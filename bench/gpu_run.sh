#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no network there): wheels for what
# its image lacks travel in .whl/ (open_clip_torch, ftfy, wcwidth: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl ...`). Usage: bench/gpu_run.sh smoke|main OUTDIR [SYNTH_ITERS] [JOBS] [LIMIT_S]
set -uo pipefail
mode=$1 out=$2 synth=${3:-200} jobs=${4:-14} limit=${5:-400}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
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
