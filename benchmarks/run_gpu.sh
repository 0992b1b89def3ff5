#!/usr/bin/env bash
# Both benchmarks at full size on one CUDA GPU (bf16 weights for every variant), JSON to stdout and to $OUT.
# Sized to finish in about 5 minutes on an H100 (model builds included); each run has its own time limit so
# that a slow torch.compile cannot take the earlier results with it.
#
#   bash benchmarks/run_gpu.sh
#
# The GPU image may hold an older transformers than this project needs (>= 5.20). Carry the wheel along:
#   python3 -m pip download --no-deps transformers==5.24.0 -d .whl      # pure Python; /.whl/ is git-ignored
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

run() {  # run NAME LIMIT_S ARGS...: one benchmark, its JSON on stdout and in $OUT/NAME.json, its log in $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "== $name: python3 $*"
    timeout "$limit" python3 "$@" 2>"$OUT/$name.log" | tee "$OUT/$name.json"
    echo "   exit ${PIPESTATUS[0]} (log: $OUT/$name.log)"
}

# Training: the course pipeline (batch 4, 128-token padding, logits everywhere) against ours at the
# memory-matched defaults (≤ 32 pairs, ≤ 512 padded positions per batch), then ours at a GPU-sized batch.
run train 140 benchmarks/bench_train.py --device cuda --course-steps 20 --steps 20 --warmup 3
run train_large_batch 80 benchmarks/bench_train.py --device cuda --variants ours --steps 40 --warmup 3 \
    --batch-size 256 --max-batch-tokens 8192
# Captioning 16 images × 20 new tokens: course loop, batched generate, batch size 1 (dynamic KV cache) ...
run caption 110 benchmarks/bench_caption.py --device cuda --images 16 --new-tokens 20
# ... and with a static cache + torch.compile of the decoding step (compiles during the untimed warm-up).
run caption_static_compile 220 benchmarks/bench_caption.py --device cuda --images 16 --new-tokens 20 \
    --variants course,ours_batched,ours_bs1 --static-cache --compile
