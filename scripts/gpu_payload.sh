#!/bin/bash
# Build what scripts/gpu_smoke.sh needs on a GPU machine with no network, into the git-ignored .gpu-vllm/:
# vLLM 0.26.0 (../shared/gpu-vllm recipe: part00, part01, kit/) and tokengate's own dependencies that the GPU
# image and vLLM's wheels lack (tgwheels/, CPython 3.12 manylinux wheels, ~7 MiB). Run where PyPI is reachable.
# Then, through the `device` tool, back to back on one machine:
#   carry [.gpu-vllm/part00, .gpu-vllm/kit]:                     mkdir -p /tmp/w && cp .gpu-vllm/part00/* /tmp/w/
#   carry [.gpu-vllm/part01, .gpu-vllm/kit, .gpu-vllm/tgwheels]: cp .gpu-vllm/part01/* /tmp/w/ &&
#                                                                 bash scripts/gpu_smoke.sh h200-1x 2
#   carry [.gpu-vllm/kit, .gpu-vllm/tgwheels]:                   bash scripts/gpu_smoke.sh h200-2x 1
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${GPU_VLLM_RECIPE:-../shared/gpu-vllm}
[ -f .gpu-vllm/part00/part00 ] || bash "$SHARED/build_parts.sh" .gpu-vllm
PL=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p .gpu-vllm/tgwheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PL[@]}" \
  -d .gpu-vllm/tgwheels orjson==3.13.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 httptools==0.9.0 \
  PyYAML==6.0.4 redis==8.1.0 jinja2==3.1.6 markupsafe==3.0.4 uvloop==0.23.0
du -sh .gpu-vllm/*
