# Sourced by the scripts run on a device machine (gpu_compare.sh, device_cpu.sh), from the repo root with $OUT set:
# vLLM 0.26.0 and its dependencies into $SITE from the carried parts (.gpu-vllm/kit/setup.sh), the gateway's own
# extra wheels into $TGSITE, each once per machine. Exits 3 when either fails.
KIT=.gpu-vllm/kit
SITE=${SITE:-/tmp/site}; TGSITE=${TGSITE:-/tmp/tgsite}
if [ ! -f "$SITE/.vllm_ok" ]; then bash $KIT/setup.sh > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 3; }; fi
if [ ! -f "$TGSITE/.ok" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$TGSITE" .gpu-vllm/tgwheels/*.whl \
    && touch "$TGSITE/.ok" || exit 3
fi
