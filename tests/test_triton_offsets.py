"""Offsets and limits of the Triton kernels at sizes no test can allocate.

Pointer offsets computed in int32 wrap past 2**31 - 1 elements. The compiled kernels' Triton IR
(sm_90, through ``bench/kernel_variants.py``' stand-in driver, in a subprocess: conftest turns on the
interpreter, which would replace the compiled kernels) shows which offsets are int32; the
dispatchers' checks show which sizes reach kernels that index in int32.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import compile_subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles the serving attention kernels for sm_90 (no GPU) on a time-major (L, B, H, Dh) view,
# whose token stride is B * H * Dh, and writes {kernel name: TTIR}.
_ATTENTION_TTIR = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
    import kernel_variants  # sets TRITON_INTERPRET=0 before any kernel is defined
    import torch
    from triton.runtime import jit
    kernel_variants.install_stand_in_driver(90)
    ttir = {}
    def compile_only(kernel_fn, grid):
        def launch(*args, **kwargs):
            compiled = kernel_fn.run(*args, grid=grid, warmup=True, **kwargs)
            ttir[kernel_fn.fn.__name__] = compiled.asm["ttir"]
            return compiled
        return launch
    jit.KernelInterface.__getitem__ = compile_only
    from rearec_kernels import attention_triton
    from rearec_kernels.kv_cache import KVCache
    B, L, H, Dh = 2, 40, 2, 64
    q = torch.zeros(L, B, H, Dh, dtype=torch.bfloat16).transpose(0, 1)
    lengths = torch.full((B,), L, dtype=torch.int32)
    cache = KVCache.allocate(1, B, H, L + 8, Dh, dtype=torch.bfloat16)
    attention_triton.prefill_attention(q, q, q, lengths, cache, 0)
    attention_triton.decode_attention(q[:, 0], q[:, 0], q[:, 0], cache, 0)
    with open(sys.argv[2], "w") as f:
        json.dump(ttir, f)
""")


@pytest.fixture(scope="module")
def attention_ttir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ttir")
    env = compile_subprocess_env(tmp)
    out = tmp / "ttir.json"
    run = subprocess.run([sys.executable, "-c", _ATTENTION_TTIR, ROOT, str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.exists(), f"no TTIR (exit {run.returncode}):\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


# A pointer tile offset by a column of per-row offsets (rows[:, None] * stride) held in int32.
_INT32_ROW_OFFSET = re.compile(r"tt\.addptr [^\n]*: tensor<\d+x1x!tt\.ptr<\w+>>, tensor<\d+x1xi32>")


@pytest.mark.parametrize("kernel", ["_prefill_kernel", "_decode_kernel"])
def test_attention_row_offsets_are_int64(attention_ttir, kernel):
    """q, k, v, out and the cache come with any strides: a token (or slot) stride times L passes 2**31
    for a time-major (L, B, H, Dh) view of more than 2**31 elements (L = 200, H = 2, Dh = 128 from
    B = 42,000 users), so the row offsets must be int64."""
    ttir = attention_ttir[kernel]
    assert "tt.addptr" in ttir
    bad = _INT32_ROW_OFFSET.findall(ttir)
    assert not bad, f"{kernel}: int32 row offsets:\n" + "\n".join(bad)


def test_topk_item_limit_keeps_the_fallback_loop_in_int32():
    """_fallback_kernel walks the table in an int32 loop of K_SEL <= MAX_SELECT items a step: for
    N > 2**31 - K_SEL its counter wrapped negative after the last step and read before the table.
    The dispatcher refuses such tables (a stride-0 view: nothing is allocated)."""
    from rearec_kernels import topk, topk_triton

    assert -(-topk.TRITON_MAX_ITEMS // topk_triton.MAX_SELECT) * topk_triton.MAX_SELECT <= 2 ** 31 - 1
    q = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="Triton backend takes up to"):
        topk._check_triton("fused_topk", q, torch.zeros(1, 4).expand(2 ** 31 - 1, 4))
    topk._check_triton("fused_topk", q, torch.zeros(1, 4).expand(topk.TRITON_MAX_ITEMS, 4))


def test_cross_entropy_item_limit_keeps_item_indices_in_int32(monkeypatch):
    """The fused cross-entropy's kernels index items in int32 (split * items_per_split, its end
    start + items_per_split, the loop counter, pid * BLOCK_N); the dispatcher took any N, so a table
    of 2**31 items wrapped them negative and read before the table. Now an explicit 'triton' refuses
    such a table and the automatic choice runs the chunked PyTorch path (stride-0 views: nothing is
    allocated)."""
    from rearec_kernels import backend as backend_mod
    from rearec_kernels import linear_cross_entropy as lce
    from rearec_kernels import linear_cross_entropy_triton as lce_triton

    op = "fused_linear_cross_entropy"
    hidden = torch.zeros(2, 4)
    huge = torch.zeros(1, 4).expand(2 ** 31, 4)
    with pytest.raises(ValueError, match="Triton backend takes up to"):
        lce._choose_backend(op, "triton", hidden, huge)
    # The automatic choice on a GPU (resolve says Triton) falls back to the chunked path.
    monkeypatch.setattr(lce, "resolve", lambda *a: backend_mod.Backend.TRITON)
    assert lce._choose_backend(op, None, hidden, huge) is backend_mod.Backend.CPU
    assert lce._choose_backend(op, None, hidden, huge[:lce.TRITON_MAX_ITEMS]) is backend_mod.Backend.TRITON

    # At the limit, the launch arithmetic of the compiled kernels (not the interpreter's small tiles)
    # keeps every split's end, and the item blocks, below 2**31.
    monkeypatch.setattr(lce_triton, "interpreting", lambda: False)
    N = lce.TRITON_MAX_ITEMS
    for d, dtype in ((64, torch.bfloat16), (256, torch.float32)):
        cfg = lce_triton.kernel_config(d, dtype)
        for row_blocks in range(1, lce_triton.PROGRAMS_TARGET + 2):
            splits = lce_triton.item_splits(row_blocks * cfg["BLOCK_B"], N, cfg)
            per_split = -(-(-(-N // splits)) // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
            splits = -(-N // per_split)
            assert splits * per_split + cfg["BLOCK_N"] <= 2 ** 31 - 1
