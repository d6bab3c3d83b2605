"""The pipeline in one command (pipeline.py) at a toy size, every stage's output loaded by the next,
its report card (report.py) checked against the files the stages wrote; a stopped pipeline
continues its stopped stage (whose resume equals the uninterrupted run: test_train, test_guards)
and skips the finished ones."""
import json
import os
import re
import subprocess
import sys

import pytest

import pipeline
import report
from test_train import SMALL_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds per stage: the tiny preset's shapes, a few steps each.
TOY = {
    "pretrain": SMALL_RUN + ["--world-people", "30", "--heldout-frac", "0.3", "--max-steps", "2", "--eval-every", "2"],
    "data": ["--examples", "200", "--eval-per-cell", "2"],
    "long": ["--seq-len", "128", "--batch-tokens", "512", "--max-steps", "2", "--full-attention-idx", "1,3",
             "--rope-theta", "1e6", "--recall-frac", "0.5"],
    "prune": ["--intermediate-size", "384", "--mamba-num-heads", "4", "--calib-samples", "4", "--distill-steps", "2"],
    "sft": ["--max-steps", "2", "--seq-len", "128"],
    "dpo": ["--prompts", "8", "--samples", "2", "--max-steps", "2", "--max-new-tokens", "8"],
    "report": ["--lengths", "128,256", "--docs", "1", "--max-new-tokens", "12"],
}
MODELS = ["base", "long-context", "pruned", "SFT", "DPO", "merged", "int8", "int4"]


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """A toy pipeline stopped in its first stage (the base's run at step 1 of 2), then run to the end."""
    pipeline.RECIPES["toy"] = TOY
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    subprocess.run([sys.executable, "train.py", *TOY["pretrain"], "--stop-at-step", "1", "--out",
                    os.path.join(out, "base")], cwd=ROOT, check=True, capture_output=True)
    pipeline.main(["--size", "toy", "--out", out])
    return out


def table(report, title="model"):
    """{row: {column: cell}} of the markdown table whose first column is title."""
    lines = report[report.index(f"| {title} |"):].split("\n\n")[0].splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    return {cells[0]: dict(zip(columns, cells[1:])) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_and_reports_from_their_files(pipeline_run):
    out = pipeline_run
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    rows = table(report)
    assert list(rows) == MODELS
    # each stage started from the one before: the lineage names its parent
    parents = {"long": "base", "pruned": "long", "sft": "pruned"}
    for sub, parent in parents.items():
        with open(os.path.join(out, sub, "ckpt", "lineage.json")) as f:
            assert os.path.realpath(json.load(f)["parent"]).startswith(os.path.realpath(os.path.join(out, parent)))
    # each later stage's rate is a fraction of pre-training's peak, not of its parent's (which compounds)
    lr = {}
    for sub in ("base", "pruned", "sft", "dpo/round1"):
        with open(os.path.join(out, sub, "ckpt", "lineage.json")) as f:
            lr[sub] = json.load(f)["loop"]["lr"]
    assert (lr["pruned"], lr["sft"], lr["dpo/round1"]) == pytest.approx((lr["base"] / 5, lr["base"] / 3, lr["base"] / 10))
    for name, sub in [("base", "base"), ("SFT", "sft"), ("int4", "int4")]:
        with open(os.path.join(out, "eval", name.lower() + ".probe.json")) as f:
            probe = json.load(f)
        assert rows[name]["val bpb"] == f"{probe['val_bpb']:.3f}"
        for bucket, (right, n) in probe["by_distance"].items():
            assert rows[name][f"recall {bucket.split(' ')[0]}"] == f"{100 * right / n:.0f}%"
        with open(os.path.join(out, "eval", name.lower() + ".tasks.json")) as f:
            cells = json.load(f)["table"]
        qa = [r for k, r in cells.items() if k.startswith("qa ")]
        assert rows[name]["qa"] == f"{sum(r['accuracy'] * r['n'] for r in qa) / sum(r['n'] for r in qa):.1f}"
        with open(os.path.join(out, "eval", name.lower() + ".speed.json")) as f:
            assert rows[name]["decode tok/s"] == f"{json.load(f)['decode_tok_s']:,.0f}"
    with open(os.path.join(out, "base", "ckpt", "lineage.json")) as f:
        assert rows["base"]["parameters"] == f"{json.load(f)['parameters'] / 1e6:.2f}M"
    assert rows["int8"]["parameters"] == rows["merged"]["parameters"] != rows["base"]["parameters"]  # pruned
    assert float(rows["int4"]["memory"].split()[0]) < float(rows["merged"]["memory"].split()[0])
    stages = table(report, "stage")
    with open(os.path.join(out, "times.json")) as f:
        times = json.load(f)
    assert set(times) == {"pretrain", "data", "long", "prune", "sft", "dpo", "merge", "int8", "int4", "report"}
    assert stages["total"]["wall time"] and re.fullmatch(r"[\dhms ]+", stages["pretrain"]["wall time"])
    assert "![every training stage's loss and evaluations](curves.png)" in report
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0 and os.path.getsize(os.path.join(out, "recall.png")) > 0


@pytest.mark.slow
def test_a_stopped_pipeline_continues_and_a_finished_one_is_left_as_it_is(pipeline_run, capsys):
    with open(os.path.join(pipeline_run, "base", "log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    with open(os.path.join(pipeline_run, "base", "ckpt", "lineage.json")) as f:
        assert steps == [1, 2] and json.load(f)["step"] == 2  # step 1 before the stop, step 2 after it
    with open(os.path.join(pipeline_run, "report.md")) as f:
        before = table(f.read())
    capsys.readouterr()
    pipeline.main(["--size", "toy", "--out", pipeline_run])
    printed = capsys.readouterr().out
    assert printed.count("done already") == 9 and "running" not in printed
    with open(os.path.join(pipeline_run, "report.md")) as f:
        assert table(f.read()) == before  # measured once: the same numbers, read from the same files


@pytest.mark.slow
def test_compare_puts_evaluations_side_by_side_pooled_from_their_files(pipeline_run, capsys):
    sft, dpo = (os.path.join(pipeline_run, "eval", f"{m}.tasks.json") for m in ("sft", "dpo"))
    capsys.readouterr()
    report.main(["--compare", f"SFT={sft}", f"DPO={dpo}"])
    rows = table(capsys.readouterr().out)
    assert list(rows) == ["SFT", "DPO"]
    with open(sft) as f:
        cells = json.load(f)["table"]
    for column, prefix, score in (("qa sft", "qa sft ", "accuracy"), ("format", "format ", "accuracy"),
                                  ("format form", "format ", "form")):
        picked = [r for k, r in cells.items() if k.startswith(prefix)]
        assert rows["SFT"][column] == f"{sum(r[score] * r['n'] for r in picked) / sum(r['n'] for r in picked):.1f}"
