# Sourced by the scripts/gpu_*.sh device runs (carry .whl/eval): installs the carried wheels
# (the GGUF model's aside) into $SITE once per machine and exports PYTHONPATH and a Triton cache
# (TRITON_CACHE_DIR as the caller set it, else /tmp/triton-cache). A fresh machine compiles every Triton kernel
# again (the daemon's start took 100-150 s cold against 10 s warm): `pack_triton_cache` leaves the cache in
# $OUT/triton-cache.tgz, and a later call that carries it as .whl/triton/triton-cache.tgz starts from it.
#   usage: . scripts/gpu_env.sh
SITE=${SITE:-/tmp/kvrecall-site}; mkdir -p "$SITE"
if [ ! -d "$SITE/grpc" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    $(ls .whl/eval/*.whl | grep -v gguf) || exit 2
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .whl/triton/triton-cache.tgz ] && [ -z "$(ls -A "$TRITON_CACHE_DIR")" ]; then
  tar xzf .whl/triton/triton-cache.tgz -C "$TRITON_CACHE_DIR" && echo "Triton cache from .whl/triton: $(ls "$TRITON_CACHE_DIR" | wc -l) entries"
fi
pack_triton_cache() {  # the compiled kernels, for the next fresh machine (carry .whl/triton)
  tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -l "$OUT/triton-cache.tgz"
}
