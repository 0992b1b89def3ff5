#!/usr/bin/env bash
# The benchmarks at full size on one CUDA GPU, then the main job at full size for its phase timings and the feature
# cache build; JSON to stdout and to $OUT. Sized to finish in about 8 minutes on an H100/H200 (model builds
# included); each run has its own time limit so that a slow step cannot take the earlier results with it.
#
#   bash benchmarks/run_gpu.sh
#
# The GPU image may hold an older transformers than this project needs (>= 5.20). Carry the wheel along:
#   python3 -m pip download --no-deps transformers==5.24.0 -d .whl      # pure Python; /.whl/ is git-ignored
# and, for the int8 captioning variant, optimum-quanto (skipped when it does not import):
#   python3 -m pip download --no-deps optimum-quanto==0.2.7 -d .whl
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

# Training: the course pipeline in its own dtypes (CLIP fp32, Qwen3 bf16; batch 4, 128-token padding, logits
# everywhere) against ours in its default precision (bf16 on this GPU) at the memory-matched defaults (≤ 32 pairs,
# ≤ 512 padded positions per batch), 2 alternating rounds; then ours at a GPU-sized batch.
run train 240 benchmarks/bench_train.py --device cuda --course-steps 20 --steps 20 --warmup 3 \
    --variants course,course_fp32,ours --results "$OUT/results.json"
run train_large_batch 80 benchmarks/bench_train.py --device cuda --variants ours --rounds 1 --steps 40 --warmup 3 \
    --batch-size 256 --max-batch-tokens 8192 --results ""
# Captioning 16 images × 20 new tokens: course loop, batched generate, batch size 1 (dynamic KV cache), int8 ...
INT8=$(python3 -c "import optimum.quanto" 2>/dev/null && echo ",ours_bs1_int8")
run caption 200 benchmarks/bench_caption.py --device cuda --images 16 --new-tokens 20 \
    --variants "course,ours_batched,ours_bs1$INT8" --results "$OUT/results.json"
# ... and with a static cache + torch.compile of the decoding step (compiles during the untimed warm-up).
run caption_static_compile 220 benchmarks/bench_caption.py --device cuda --images 16 --new-tokens 20 --rounds 1 \
    --variants course,ours_batched,ours_bs1 --static-cache --compile --results ""

# The main job at full size (random weights: the GPU machine cannot reach the Hub) on the embedded data set: its
# phase timings (model loading, data preparation, feature cache, training, evaluation, export) from all_results.json.
# The feature cache is built twice, with 1 and with 8 preprocessing workers, each into its own folder.
main_job() {  # main_job NAME LIMIT_S WORKERS FLAGS...
    local name=$1 limit=$2 workers=$3; shift 3
    echo "== $name: run_captioning.py at full size, --preprocessing_num_workers $workers $*"
    timeout "$limit" python3 run_captioning.py --model_name_or_path "$OUT/full-size-random" --dataset_name embedded \
        --output_dir "$OUT/$name" --feature_cache_dir "$OUT/$name-features" --preprocessing_num_workers "$workers" \
        --per_device_train_batch_size 64 --per_device_eval_batch_size 64 --max_new_tokens 20 --report_to none \
        --save_strategy no --eval_strategy no --dataloader_pin_memory False "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? (log: $OUT/$name.log)"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({k: v for k, v in r.items()
        if k.startswith('time_') or k in ('train_runtime', 'eval_rougeL')}, indent=1))" "$OUT/$name/all_results.json" \
        | tee "$OUT/$name-phases.json" || true
}
timeout 120 python3 benchmarks/make_random_model.py "$OUT/full-size-random" \
    && main_job main_full_size_w8 300 8 --do_train --do_eval --max_steps 100 \
    && main_job main_full_size_w1 150 1 --do_train --max_steps 10
