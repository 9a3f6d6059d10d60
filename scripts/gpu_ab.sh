#!/usr/bin/env bash
# Two AR recipes trained one after the other for the same minutes on the device machine, returned together:
#   A=recipes/text_ar_ts4_gpu_byte_index.yaml B=recipes/text_ar_ts4_gpu_glyph.yaml MINUTES=4.3 bash scripts/gpu_ab.sh
# with carry ['.device'], as scripts/gpu_train.sh (which trains each arm; its env applies: TOKENIZER, WORKERS,
# PRECISION, STEPS). Two arms' models are more files than the device tool returns (8), so both arms' folders
# (fp16 parts, parts.json, model_config.json, metrics.jsonl) travel as one tar, split: OUT/ab.tar.part0..
# (6 for two medium models), OUT/parts.json and OUT/ab.log (both arms' output). Here:
#   python scripts/device_tree.py join OUT ab.tar && tar -xf ab.tar   # a/ and b/, each a gpu_train.sh OUT
#   python scripts/device_tree.py join a a/model.safetensors          # and the same for b
set -uo pipefail
cd "$(dirname "$0")/.."
# the glyph head's A/B: the two recipes differ only by it (tests/train/test_recipes.py)
A=${A:-recipes/text_ar_ts4_gpu_byte_index.yaml}
B=${B:-recipes/text_ar_ts4_gpu_glyph.yaml}
OUT=${OUT:-runs/gpu_out}
PY=${PY:-python3}
WORK=$(mktemp -d) || exit 1
mkdir -p "$OUT" "$WORK/arms" || exit 1
rm -f "$OUT"/ab.tar.part* "$OUT/parts.json" "$OUT/ab.log"  # never return an earlier run's files
pack() {  # the arms' exports so far -> OUT/ab.tar.part* + parts.json (train.log stays out: progress bars)
  tar -cf "$WORK/ab.tar" -C "$WORK/arms" --exclude=train.log --exclude=train_workers.log . || return 1
  local bytes; bytes=$(stat -c %s "$WORK/ab.tar")
  if [ "$bytes" -gt $(( 6 * 15 * 2**20 )) ]; then  # 6 parts + parts.json + ab.log: the 8 files that come back
    echo "the arms' exports are $bytes bytes, more than 6 parts of 15 MiB: use smaller models" >&2; return 1
  fi
  "$PY" scripts/device_tree.py split "$WORK/ab.tar" "$OUT"
}
# killed at the call's time limit: return what the arms have exported (gpu_train.sh exports every 90 s)
trap 'pack; exit 143' TERM
rc=0
for arm in a b; do
  recipe=$A; [ "$arm" = b ] && recipe=$B
  echo "arm $arm: $recipe"
  RECIPE=$recipe OUT="$WORK/arms/$arm" RUN="$WORK/run_$arm" bash scripts/gpu_train.sh ar >> "$OUT/ab.log" 2>&1
  arm_rc=$?
  [ $arm_rc -ne 0 ] && rc=$arm_rc
  echo "arm $arm rc $arm_rc"; tail -2 "$WORK/arms/$arm/metrics.jsonl" 2>/dev/null
  pack  # after each arm, so a run cut short still returns the first
done
exit $rc
