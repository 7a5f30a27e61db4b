import os

# No GPU where the suite runs: Triton kernels, when a test forces them, run in Triton's interpreter.
# Set before any module defines a kernel (triton.jit reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
