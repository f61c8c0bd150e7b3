#!/bin/bash
# The gateway's CPU-side benchmarks on a bigger host than the 2-core development VM (a `device` machine; its GPUs
# are not used): bench/soak.py at 10,000 concurrent streams (needs > 20,000 open files, more than the dev VM
# allows) and bench/scale.py (`tokengate serve --workers N` on N cores, with cores left for the fake workers and
# the load clients).
#
#   bash scripts/device_cpu.sh [soak|scale|all]      (default all)
#
# Same payload as scripts/gpu_compare.sh (the gateway's dependencies come from the vLLM site it installs: carry
# .gpu-vllm/kit and .gpu-vllm/tgwheels once /tmp/w holds the parts). Results go to $OUT (default /tmp/out).
# Overrides: STREAMS (10000), SOAK_SECONDS (40), SCALE_N (1,2,4,8), GATEWAY_CPUS (0-7), WORKER_CPUS (8-11),
# CLIENT_CPUS (12-15), SCALE_ROUNDS (3), SCALE_SECONDS (5), SCALE_COUNT (remote).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# shellcheck source=scripts/device_site.sh
. scripts/device_site.sh
export PYTHONPATH=$TGSITE:$SITE:$PWD PYTHONUNBUFFERED=1
what=${1:-all}
{ nproc; grep -m1 "model name" /proc/cpuinfo; python3 --version; ulimit -Hn; cat /proc/sys/fs/nr_open; } \
  | tee "$OUT/host.txt"
RC=0
if [ "$what" = soak ] || [ "$what" = all ]; then
  # the load client, the gateway and the fake worker each hold one socket per stream
  ulimit -Hn 1048576 2>/dev/null; ulimit -n "$(ulimit -Hn)"
  echo "open files: $(ulimit -n)"
  python3 -m bench.soak --streams "${STREAMS:-10000}" --duration "${SOAK_SECONDS:-40}" \
    --out "$OUT/soak-${STREAMS:-10000}.json" > "$OUT/soak.log" 2>&1
  rc=$?; echo "soak rc=$rc"; tail -25 "$OUT/soak.log"; [ $rc -eq 0 ] || RC=$rc
fi
if [ "$what" = scale ] || [ "$what" = all ]; then
  python3 -m bench.scale --gateway-workers "${SCALE_N:-1,2,4,8}" --gateway-cpus "${GATEWAY_CPUS:-0-7}" \
    --worker-cpus "${WORKER_CPUS:-8-11}" --client-cpus "${CLIENT_CPUS:-12-15}" --rounds "${SCALE_ROUNDS:-3}" \
    --round-seconds "${SCALE_SECONDS:-5}" --count "${SCALE_COUNT:-remote}" --out "$OUT" 2>&1 | tee "$OUT/scale.log"
  rc=${PIPESTATUS[0]}; echo "scale rc=$rc"; [ $rc -eq 0 ] || RC=$rc
fi
exit $RC
