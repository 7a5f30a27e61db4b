"""bench/gpu_check.py cannot rot: ``--device cpu --tiny`` runs every section end to end on tiny shapes
in Triton's interpreter, and must exit 0 with the final table printed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def test_gpu_check_tiny_runs_end_to_end(tmp_path):
    rows_path = tmp_path / "rows.json"
    # $OUT (a device runner's folder for files to bring back) gets the rows and the log as they come.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"))
    run = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--json", str(rows_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-3000:]}"
    out = run.stdout
    assert "torch" in out.splitlines()[0] and "triton" in out.splitlines()[0]  # versions come first
    assert "== final table ==" in out
    rows = json.loads(rows_path.read_text())
    sections = {r["section"] for r in rows}
    assert {"attention", "topk", "engine"} <= sections
    checks = [str(r.get("check", "")) for r in rows]
    assert not [c for c in checks if c.startswith("FAIL")]
    assert sum(c.startswith("ok") for c in checks) >= 20  # parity rows really ran
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == rows
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "== final table ==" in log and out.splitlines()[0] in log
    # Each row was printed as it was measured, before the final table.
    before_table = out.split("== final table ==")[0]
    assert all(r["op"][:20] in before_table for r in rows if r.get("op"))


def test_failing_section_becomes_a_row_and_the_run_goes_on():
    sys.path.insert(0, BENCH)
    try:
        from gpu_common import Context
    finally:
        sys.path.remove(BENCH)
    import torch

    lines = []
    ctx = Context(device=torch.device("cpu"), mode="tiny", out=lines.append)

    def broken():
        raise ZeroDivisionError("boom")

    assert ctx.guarded("demo", "broken part", broken, shape="x") is None
    ctx.emit("demo", op="next part", check="ok")
    assert ctx.rows[0]["check"].startswith("FAIL ZeroDivisionError: boom") and ctx.rows[0]["shape"] == "x"
    assert ctx.rows[1]["op"] == "next part"
    assert any("Traceback" in line for line in lines)  # the error is printed, not swallowed
