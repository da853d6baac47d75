"""GPU-only tests (marked gpu; skipped where CUDA is missing)."""

# Their daemons skip the start-up warm-up (bf16, head dim 128: shapes these tests do not use), so
# each compiles only the kernels it runs; tests/integration/test_warmup.py covers the warm-up.
NO_WARMUP = ["--warmup", ""]
