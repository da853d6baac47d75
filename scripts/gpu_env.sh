# Sourced by the scripts/gpu_*.sh device runs (carry .whl/eval): installs the carried wheels
# (the GGUF model's aside) into $SITE once per machine and exports PYTHONPATH and a Triton cache
# (TRITON_CACHE_DIR as the caller set it, else /tmp/triton-cache).
#   usage: . scripts/gpu_env.sh
SITE=${SITE:-/tmp/kvrecall-site}; mkdir -p "$SITE"
if [ ! -d "$SITE/grpc" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $(ls .whl/eval/*.whl | grep -v gguf) || exit 2
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
