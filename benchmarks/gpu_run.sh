#!/usr/bin/env bash
# The GPU figures of the README in one run (about 7 minutes on one H200):
#   1. the erase-seven example trained on the GPU in fp32, fp16 and bf16 (time, and whether half
#      precision erases as fp32 does: judged by `leco eval` with keep: all at the end);
#   2. benchmarks/gpu_scale.py: full-size SD1.5 / SD2.1-v / SDXL steps and peak memory, the most
#      telling rows first, within a time budget.
# Usage: bash benchmarks/gpu_run.sh [OUTPUT_DIR]   (leco and its dependencies importable)
set -u
out=${1:-gpu_run_out}
device=${LECO_DEVICE:-cuda}  # cpu: a dry run of the commands where there is no GPU
loras_dir=$(mktemp -d)  # the LoRAs stay behind: only the logs and the report are results
mkdir -p "$out" || exit 1  # the logs and the report go there: no run without it
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

loras=()
for precision in fp32 fp16 bf16; do
    start=$SECONDS
    timeout 120 python3 -m leco train examples/ink-digits/erase_seven.yaml --set train.device="$device" \
        --set train.precision=$precision --set save.path="$loras_dir" --set save.name=no_seven_$precision \
        > "$out/train_$precision.log" 2>&1 || tail -5 "$out/train_$precision.log"
    grep -E "^done" "$out/train_$precision.log"
    echo "erase_seven on $device, $precision: $((SECONDS - start)) s wall, process start and model load included"
    loras+=(--lora "$loras_dir/no_seven_${precision}_last.safetensors")
done

python3 benchmarks/gpu_scale.py --steps 4 --budget-s "${GPU_SCALE_BUDGET_S:-240}"

start=$SECONDS
timeout 150 python3 -m leco eval --model ink-digits "${loras[@]}" --device "$device" \
    --images-per-prompt 4 --spec examples/ink-digits/erase_seven_eval.yaml --out "$out/eval_report.json" 2>&1 | tail -40
echo "leco eval of 3 LoRAs on $device: $((SECONDS - start)) s"
