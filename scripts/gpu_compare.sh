#!/bin/bash
# Gateway overhead on a GPU machine with no network (run through the `device` tool): one vLLM on GPU 0, tokengate
# in front of it, and scripts/gpu_compare.py measuring client -> vLLM vs client -> tokengate -> the same vLLM.
#
#   bash scripts/gpu_compare.sh [gpu_compare.py args...]     e.g. --concurrency 1,16,64 --rounds 3 --max-tokens 64
#
# Same payload and setup as scripts/gpu_smoke.sh (see scripts/gpu_payload.sh's header; carry .gpu-vllm/kit and
# .gpu-vllm/tgwheels once /tmp/w holds the parts). Results go to $OUT (default /tmp/out): gpu_compare_LABEL.{json,md,log},
# gpus_compare.txt, vllm_compare.log, gateway_compare.log. LABEL defaults to the card (h100, h200, ...).
# Test overrides: SITE, TGSITE, TINY, VLLM_PORT, GW_PORT, EXTRA_VLLM_ARGS (word-split), LABEL.
# CPU pinning (taskset lists; default none): PIN_VLLM, PIN_GATEWAY, PIN_CLIENT. EAGER= (empty): CUDA graphs on.
# GW_ARGS: more `tokengate serve` flags, e.g. GW_ARGS="--workers 4".
# GW2_ARGS (set, even empty): a second gateway in front of the same vLLM with these flags, on GW2_PORT (8081),
# pinned to PIN_GATEWAY2, measured in the same rotation as arm GW2_NAME (default "gateway2"), e.g.
# GW2_ARGS="--busy-poll 0.1" GW2_NAME=poll. Its log and metrics go next to the first one's (…_GW2_NAME.*).
# ROUTER=DIR: also the Rust vllm-router (arm "router", round robin, on ROUTER_PORT 8082, pinned to PIN_ROUTER) from
# DIR/router.tar.xz (its package, its abi3 library and their .libs) and DIR/wheels/*.whl (aiohttp & co. for the
# machine's Python), unpacked into /tmp/rsite once per machine.
# SHAPE=8b: the tiny model's tokenizer with a Llama-3-8B-shaped config and random weights (vLLM --load-format dummy):
# decode steps as long as a real 8B model's, so the engine, not its Python front end, sets the pace.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TINY=${TINY:-/tmp/tiny}
VLLM_PORT=${VLLM_PORT:-8001}; GW_PORT=${GW_PORT:-8080}
# shellcheck source=scripts/device_site.sh
. scripts/device_site.sh
if [ ! -f "$TINY/config.json" ]; then
  PYTHONPATH=$SITE python3 $KIT/mktiny.py "$TINY" > "$OUT/mktiny.log" 2>&1 || { tail -30 "$OUT/mktiny.log"; exit 4; }
fi
if [ "${SHAPE:-tiny}" = 8b ]; then
  mkdir -p /tmp/dummy8b && cp "$TINY"/*.json "$TINY"/*.jinja /tmp/dummy8b/ 2>/dev/null
  python3 - <<'PY' || exit 4
import json
p = "/tmp/dummy8b/config.json"
c = json.load(open(p))
c.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
         num_key_value_heads=8, max_position_embeddings=8192, torch_dtype="bfloat16", dtype="bfloat16")
c.pop("head_dim", None)
json.dump(c, open(p, "w"), indent=1)
PY
  TINY=/tmp/dummy8b
  EXTRA_VLLM_ARGS="${EXTRA_VLLM_ARGS:-} --load-format dummy --dtype bfloat16"
fi
export PYTHONPATH=$TGSITE:$SITE:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus_compare.txt"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -1)
LABEL=${LABEL:-$(echo "${GPU_NAME:-gpu}" | sed 's/^NVIDIA //' | awk '{print tolower($1)}' | cut -d- -f1)}
LABEL=${LABEL:-gpu}
SETSID=$(command -v setsid || true)   # own process group: the fallback SIGKILL also reaches vLLM's engine process

VL=""; GW=""; GW2=""; RT=""
ROUTER_PORT=${ROUTER_PORT:-8082}
GW2_PORT=${GW2_PORT:-8081}; GW2_NAME=${GW2_NAME:-gateway2}
stop() {  # stop PID NAME SECONDS: SIGTERM, wait, then SIGKILL its process group
  local pid=$1 name=$2 t=$3 end rc
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null
  end=$((SECONDS + t))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name still up ${t} s after SIGTERM: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null; rc=$?
  echo "$name exited ($rc)"
}
cleanup() {
  stop "$GW" gateway 30; GW=""; stop "$GW2" "$GW2_NAME" 30; GW2=""; stop "$RT" router 30; RT=""; stop "$VL" vllm 60; VL=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() {  # wait_http URL PID SECONDS LOG
  local url=$1 pid=$2 end=$((SECONDS + $3)) log=$4
  while [ $SECONDS -lt $end ]; do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { echo "exited before $url answered; tail of $log:"; tail -40 "$log"; return 1; }
    sleep 1
  done
  echo "$url not ready after $3 s; tail of $log:"; tail -40 "$log"; return 1
}

t0=$SECONDS
# shellcheck disable=SC2086  # EXTRA_VLLM_ARGS is word-split on purpose
CUDA_VISIBLE_DEVICES=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ALLREDUCE_USE_SYMM_MEM=0 $SETSID \
  ${PIN_VLLM:+taskset -c "$PIN_VLLM"} python3 -m vllm.entrypoints.openai.api_server --model "$TINY" --served-model-name tiny-llama \
  --host 127.0.0.1 --port "$VLLM_PORT" --max-model-len 4096 ${EAGER---enforce-eager} --gpu-memory-utilization 0.9 \
  ${EXTRA_VLLM_ARGS:-} > "$OUT/vllm_compare.log" 2>&1 &
VL=$!
wait_http "http://127.0.0.1:$VLLM_PORT/health" "$VL" 300 "$OUT/vllm_compare.log" || exit 5
echo "vLLM healthy after $((SECONDS - t0)) s"
# shellcheck disable=SC2086  # GW_ARGS is word-split on purpose (e.g. GW_ARGS="--workers 4")
$SETSID ${PIN_GATEWAY:+taskset -c "$PIN_GATEWAY"} python3 -m app.cli serve --host 127.0.0.1 --port "$GW_PORT" --upstream "http://127.0.0.1:$VLLM_PORT" ${GW_ARGS:-} \
  > "$OUT/gateway_compare.log" 2>&1 &
GW=$!
wait_http "http://127.0.0.1:$GW_PORT/readyz" "$GW" 60 "$OUT/gateway_compare.log" || exit 6
ALSO=()
if [ -n "${GW2_ARGS+set}" ]; then
  # shellcheck disable=SC2086  # GW2_ARGS is word-split on purpose
  $SETSID ${PIN_GATEWAY2:+taskset -c "$PIN_GATEWAY2"} python3 -m app.cli serve --host 127.0.0.1 --port "$GW2_PORT" \
    --upstream "http://127.0.0.1:$VLLM_PORT" $GW2_ARGS > "$OUT/gateway_compare_$GW2_NAME.log" 2>&1 &
  GW2=$!
  wait_http "http://127.0.0.1:$GW2_PORT/readyz" "$GW2" 60 "$OUT/gateway_compare_$GW2_NAME.log" || exit 6
  ALSO=(--also "$GW2_NAME=http://127.0.0.1:$GW2_PORT")
fi
if [ -n "${ROUTER:-}" ]; then
  if [ ! -f /tmp/rsite/.ok ]; then
    mkdir -p /tmp/rsite && tar -xJf "$ROUTER/router.tar.xz" -C /tmp/rsite \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/rsite "$ROUTER"/wheels/*.whl \
      && touch /tmp/rsite/.ok || exit 7
  fi
  PYTHONPATH=/tmp/rsite:$PYTHONPATH $SETSID ${PIN_ROUTER:+taskset -c "$PIN_ROUTER"} python3 -c \
    'import sys; from vllm_router.launch_router import main; sys.argv[0] = "vllm-router"; sys.exit(main())' \
    --host 127.0.0.1 --port "$ROUTER_PORT" --worker-urls "http://127.0.0.1:$VLLM_PORT" --policy round_robin \
    --prometheus-port 29000 > "$OUT/router_compare.log" 2>&1 &
  RT=$!
  wait_http "http://127.0.0.1:$ROUTER_PORT/health" "$RT" 60 "$OUT/router_compare.log" || exit 7
  ALSO+=(--also "router=http://127.0.0.1:$ROUTER_PORT")
fi
echo "gateway ready; label $LABEL"
${PIN_CLIENT:+taskset -c "$PIN_CLIENT"} python3 scripts/gpu_compare.py --direct "http://127.0.0.1:$VLLM_PORT" --gateway "http://127.0.0.1:$GW_PORT" \
  "${ALSO[@]}" --model tiny-llama --label "$LABEL" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_compare_$LABEL.log"
RC=${PIPESTATUS[0]}
# the gateway's own view of the run (queueing before dispatch, relay time per chunk, TTFT as it measured it)
save_metrics() {  # save_metrics PORT FILE
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://127.0.0.1:$1/metrics" > "$2" 2>/dev/null
}
save_metrics "$GW_PORT" "$OUT/gateway_metrics_$LABEL.txt"
[ -n "$GW2" ] && save_metrics "$GW2_PORT" "$OUT/gateway_metrics_${LABEL}_$GW2_NAME.txt"
cleanup
grep -v "Warning\|warn(" "$OUT/gateway_compare.log" | grep -i "error\|traceback" | tail -5
echo "gpu_compare rc=$RC, total $((SECONDS - t0)) s"
exit "$RC"
