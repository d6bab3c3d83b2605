"""bench.py: the GPU report's parts that run anywhere run here (the Triton scans against the
reference through the interpreter), and on a machine without a GPU the report says what it
skips and why, instead of failing."""
import pytest
import torch

import bench


def test_the_grid_passes_through_the_interpreter():
    ok, rows = bench.grid(small=True)
    assert ok and len(rows) == 6 and all(r.endswith("ok") for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the report runs for real: python bench.py gpu")
def test_the_gpu_report_without_a_gpu_runs_what_it_can_and_says_why_it_skips(capsys):
    bench.main(["gpu", "--budget", "120"])
    printed = capsys.readouterr().out
    assert "| grid | yes | ok" in printed
    for part in ("scans", "train", "infer"):
        assert f"| {part} | no | ok: skipped: no CUDA GPU |" in printed
