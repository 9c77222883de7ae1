#!/usr/bin/env bash
# The GPU checks of the open issues in one short script (CI has no GPU; run this where one is):
#   bash scripts/gpu_check.sh DATA_DIR OUT_DIR
# DATA_DIR holds tok/ (a 32,768-id BPE from `accel-trainer train-tokenizer`) and stdlib/ (prepared
# with it by `accel-trainer prepare-data`), so nothing is tokenised or downloaded on the GPU machine.
# Each step has its own time limit and prints one result line; the summary is OUT_DIR/summary.txt.
set -u
DATA=${1:?DATA_DIR}; OUT=${2:?OUT_DIR}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
STAGES=${STAGES:-"tests moe mfu runs hfmoe lora fsdp"}  # a subset reruns part of it
PRESET=${PRESET:-4090} STEPS=${STEPS:-150} BLOCK=${BLOCK:-2048}  # smaller for a CPU dry run of this script
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
steps() {  # tokens/s, MFU and peak memory of a run, from its metrics.jsonl (steps after the first log)
  $PY - "$1" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
rows = [r for r in rows if r.get("tokens_per_second")][1:]
def med(key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")
mem = max((r.get("memory/peak_allocated_gib") or 0) for r in rows) if rows else float("nan")
print(f"   {sys.argv[1]}: tokens/s {med('tokens_per_second'):,.0f}  step {med('step_time'):.3f} s  "
      f"MFU {med('mfu'):.3f}  peak alloc {mem:.1f} GiB  last loss {rows[-1]['loss'] if rows else 'n/a'}")
EOF
}

log "device: $(nvidia-smi -L | head -1); torch $($PY -c 'import torch; print(torch.__version__)')"

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage tests; then
log "GPU tests: fp16 scaler once per step; bit-exact resume with --full_determinism (fp16, bf16)"
timeout 150 $PY -m pytest -q -p no:cacheprovider --tb=short tests/unit/test_optim.py tests/integration/test_resume_e2e.py \
  -k "fp16 or gpu" 2>&1 | tail -25 | tee -a "$OUT/summary.txt"
fi

if stage moe; then
log "MoE layer at the 18b shape, bf16: grouped vs loop vs dense"
timeout 90 $PY benchmarks/moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --expert 1536 \
  --experts 64 --top_k 6 2>&1 | tail -12 | tee -a "$OUT/summary.txt"
log "Qwen3-30B-A3B's MoE layer, bf16: transformers' block on eager / its grouped_mm / our engine (issue #29)"
timeout 90 $PY benchmarks/moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --expert 768 \
  --experts 128 --top_k 8 2>&1 | tail -12 | tee -a "$OUT/summary.txt"
fi

if stage mfu; then
log "18b layer shapes (4 layers), bf16, 1 x 4096 tokens: eager/compiled x AC off/on, and the eager profile"
timeout 420 $PY benchmarks/mfu.py --layers 4 --steps 5 --warmup 2 2>&1 | grep -v USDT | tail -14 | tee -a "$OUT/summary.txt"
fi

COMMON=(--preset $PRESET --prepared_data "$DATA/stdlib" --mixed_precision bf16 --per_device_train_batch_size 8
        --block_size $BLOCK --max_steps $STEPS --logging_steps 25 --eval_steps 0 --save_steps 0 --disable_tqdm)
stage runs && for variant in eager gradient_checkpointing torch_compile; do
  flags=(); [ "$variant" != eager ] && flags=(--$variant)
  log "$PRESET preset, bf16, batch 8 x $BLOCK, $STEPS steps: $variant"
  timeout 150 $PY recipes/moe18b.py "${COMMON[@]}" "${flags[@]}" --output_dir "$OUT/run_$variant" \
    >"$OUT/run_$variant.log" 2>&1; echo "   exit $?" | tee -a "$OUT/summary.txt"
  steps "$OUT/run_$variant"
done

# Issue #29: a ~1.2B-total Qwen3-MoE from a config (12 layers, 64 experts of 512, top-8), compiled, bf16:
# its experts on our engine vs on transformers' own grouped_mm (target: ours >= 2x tokens/s, MFU).
QWEN=(--model_type qwen3_moe --config_overrides "hidden_size=1024,num_hidden_layers=12,num_attention_heads=16,num_key_value_heads=4,intermediate_size=3072,moe_intermediate_size=512,num_experts=64,num_experts_per_tok=8"
      --tokenizer_name "$DATA/tok" --prepared_data "$DATA/stdlib" --mixed_precision bf16 --per_device_train_batch_size 8
      --block_size $BLOCK --max_steps $STEPS --logging_steps 25 --eval_steps 0 --save_steps 0 --disable_tqdm --torch_compile)
stage hfmoe && for kernel in accel_trainer grouped_mm; do
  log "Qwen3-MoE ~1.2B from a config, bf16, compiled, batch 8 x $BLOCK, $STEPS steps: experts on $kernel"
  timeout 240 $PY recipes/causal_lm.py "${QWEN[@]}" --experts_implementation $kernel --output_dir "$OUT/qwen_$kernel" \
    >"$OUT/qwen_$kernel.log" 2>&1; echo "   exit $?" | tee -a "$OUT/summary.txt"
  steps "$OUT/qwen_$kernel"
done

if stage lora; then
# Issue #30: the fine-tuning figures on the GPU (packing, LoRA vs full, AdamW vs Muon for adapters), then
# QLoRA (--load_in_4bit) on the same base and data where bitsandbytes is installed.
log "fine-tuning benchmark (packing, LoRA vs full, adapters' optimizer) on the GPU"
timeout 240 $PY benchmarks/fine_tuning.py --workdir "$OUT/ft" 2>&1 | grep -v -i warn | tail -16 | tee -a "$OUT/summary.txt"
if $PY -c "import bitsandbytes" 2>/dev/null; then
  log "QLoRA: LoRA r=8 on the 4-bit base, packed chat data, bf16, 30 steps"
  timeout 120 $PY recipes/causal_lm.py --model_name_or_path "$OUT/ft/base" --chat_data "$OUT/ft/chat.jsonl" --packing \
    --block_size 512 --lora_r 8 --load_in_4bit --mixed_precision bf16 --learning_rate 3e-3 --max_steps 30 \
    --logging_steps 5 --eval_steps 30 --save_steps 30 --disable_tqdm --output_dir "$OUT/qlora" >"$OUT/qlora.log" 2>&1
  echo "   exit $?; $(grep -m1 -- "--lora_r" "$OUT/qlora.log")" | tee -a "$OUT/summary.txt"
  steps "$OUT/qlora"
else
  log "QLoRA: skipped, bitsandbytes is not installed here"
fi
rm -rf "$OUT"/ft/*/checkpoints "$OUT"/qlora/checkpoints
fi

stage fsdp || exit 0
log "Accelerate FSDP2 path (bf16 from the config file), one process, --full_determinism: save every 20 steps, kill -9 after step-40, resume"
F=(--preset $PRESET --prepared_data "$DATA/stdlib" --per_device_train_batch_size 4 --block_size 512
   --logging_steps 1 --eval_steps 0 --save_steps 20 --lr_schedule_steps 100 --full_determinism --disable_tqdm --output_dir "$OUT/fsdp")
LAUNCH=($PY -m accelerate.commands.launch --config_file accelerate_configs/container_multigpu.yaml
        --num_processes 1 recipes/moe18b.py)
setsid "${LAUNCH[@]}" "${F[@]}" --max_steps 100 >"$OUT/fsdp_first.log" 2>&1 &
pid=$!
for _ in $(seq 240); do
  # killed a few steps after step-40 was saved, so the resumed run repeats steps the first one logged
  grep -qs "step-40" "$OUT/fsdp/checkpoints/latest" && [ "$(wc -l <"$OUT/fsdp/metrics.jsonl")" -ge 45 ] && break
  sleep 0.5
done
# torchrun starts the worker in a session of its own: kill every process of this run, as a node loss would.
pkill -9 -f -- "--output_dir $OUT/fsdp"; wait $pid 2>/dev/null; sleep 1
echo "   killed; latest -> $(cat "$OUT/fsdp/checkpoints/latest" 2>/dev/null)" | tee -a "$OUT/summary.txt"
cp "$OUT/fsdp/metrics.jsonl" "$OUT/fsdp_killed_metrics.jsonl" 2>/dev/null
timeout 120 "${LAUNCH[@]}" "${F[@]}" --max_steps 60 --resume_from_checkpoint latest >"$OUT/fsdp_resume.log" 2>&1
echo "   resume exit $?; $(grep -m1 "^accel_trainer:" "$OUT/fsdp_resume.log")" | tee -a "$OUT/summary.txt"
$PY - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
read = lambda p: {r["step"]: r["loss"] for r in map(json.loads, open(p)) if "loss" in r}
killed, resumed = read(sys.argv[1] + "/fsdp_killed_metrics.jsonl"), read(sys.argv[1] + "/fsdp/metrics.jsonl")
both = sorted(s for s in killed if s > 40 and s in resumed)
diff = max((abs(killed[s] - resumed[s]) for s in both), default=float("nan"))
print(f"   steps run twice (killed run, resumed run): {both[:1]}..{both[-1:]} max |loss diff| {diff:.2e}; "
      f"resumed run reached step {max(resumed, default=0)}")
EOF
$PY -m accel_trainer.cli verify "$OUT/fsdp" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
rm -rf "$OUT"/*/checkpoints "$OUT"/run_*/runs  # keep logs and metrics only (what comes back is capped)
