#!/bin/bash
# Managed GPU workers end to end on a GPU machine with no network (run through the `device` tool).
#
#   bash scripts/gpu_smoke.sh PRESET EXPECTED_WORKERS [GPUS]
#
# Needs vLLM from ../shared/gpu-vllm (built into .gpu-vllm/, parts copied to /tmp/w) and the gateway's own wheels
# in .gpu-vllm/tgwheels (scripts/gpu_payload.sh). Starts `tokengate serve --region fr --preset PRESET` on a tiny
# random Llama, runs scripts/gpu_check.py against it (SDK, caps, load over every worker, kill -9 + restart),
# then SIGTERMs the gateway and checks that no worker process and no GPU context is left. Results go to $OUT.
set -u
PRESET=${1:?preset}; EXPECTED=${2:?expected workers}; GPUS=${3:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
KIT=.gpu-vllm/kit
if [ ! -f /tmp/site/.vllm_ok ]; then bash $KIT/setup.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 3; }; fi
if [ ! -f /tmp/tgsite/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tgsite .gpu-vllm/tgwheels/*.whl && touch /tmp/tgsite/.ok || exit 3
fi
if [ ! -f /tmp/tiny/config.json ]; then
  PYTHONPATH=/tmp/site python3 $KIT/mktiny.py /tmp/tiny > "$OUT/mktiny.log" 2>&1 || { tail -30 "$OUT/mktiny.log"; exit 4; }
fi
export PYTHONPATH=/tmp/tgsite:/tmp/site:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus_$PRESET.txt"
GPUARG=(); [ -n "$GPUS" ] && GPUARG=(--gpus "$GPUS")
SERVE=(--region fr --preset "$PRESET" --model /tmp/tiny --served-model-name tiny-llama
  --max-model-len 4096 "${GPUARG[@]}" --port 8080 --state-dir /tmp/tgstate
  --worker-arg=--enforce-eager --worker-arg=--disable-custom-all-reduce
  --worker-env VLLM_USE_FLASHINFER_SAMPLER=0 --worker-env VLLM_ALLREDUCE_USE_SYMM_MEM=0)
echo "== worker command lines (tokengate serve --dry-run)"
python3 -m app.cli serve "${SERVE[@]}" --dry-run | tee "$OUT/dryrun_$PRESET.txt"
rm -f /tmp/tgstate/logs/*.log
python3 -m app.cli serve "${SERVE[@]}" --log-level info > "$OUT/gateway_$PRESET.log" 2>&1 &
GW=$!
python3 scripts/gpu_check.py http://127.0.0.1:8080 "$OUT" "$PRESET" "$EXPECTED"; RC=$?
python3 -m app.cli presets pick --model /tmp/tiny --region fr --gpu "${PRESET%%-*}" --context 4096 \
  --concurrency 1 --json > "$OUT/pick_$PRESET.json"
python3 scripts/gpu_report.py "$OUT" "$PRESET" /tmp/tgstate/logs | tee "$OUT/report_$PRESET.txt"
t0=$(date +%s%N)
kill -TERM $GW; wait $GW; GWRC=$?
echo "gateway exit $GWRC, $(( ($(date +%s%N) - t0) / 1000000 )) ms after SIGTERM" | tee -a "$OUT/gpus_$PRESET.txt"
sleep 2
LEFT=$(pgrep -f "vllm.entrypoints.openai.api_server" | wc -l)
CTX=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -c . || true)
echo "after shutdown: $LEFT worker processes, $CTX GPU contexts" | tee -a "$OUT/gpus_$PRESET.txt"
cp /tmp/tgstate/logs/*.log "$OUT/" 2>/dev/null
for f in /tmp/tgstate/logs/*.log; do echo "---- $f"; grep -v "Warning\|warn(" "$f" | tail -8; done
[ "$LEFT" -ne 0 ] || [ "$CTX" -ne 0 ] && RC=5
tail -20 "$OUT/gateway_$PRESET.log"
exit $RC
