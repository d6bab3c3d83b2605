"""
pipeline.py: PLaMo 2's pipeline in one command, one model through every stage in the order of the
technical report, each stage's output the next one's input:

    python pipeline.py                        # the laptop recipe: the tiny model, about 35 minutes on 2 cores
    python pipeline.py --size 1b --data /data/prepared --conversations sft.jsonl --pairs pairs.jsonl \\
        --eval eval.jsonl --out out/pipeline-1b   # the same pipeline on a GPU node (under torchrun: --nproc)

    1. pretrain  train.py      the hybrid (Mamba + sliding-window attention), from scratch
    2. data      tasks.py      instruction data about the synthetic world the base learned (tiny), or
                               your --conversations
    3. long      train.py      continual pre-training: every attention layer full, RoPE base 1e6, a
                               longer context, recall documents in the text
    4. prune     prune.py      Minitron pruning of the long-context model, distilled from it
    5. sft       posttrain.py  supervised fine-tuning in the chat template
    6. dpo       posttrain.py  DPO on the SFT model's own answers (tiny), or on --pairs
    7. merge     merge.py      DPO merged back into SFT (linear)
    8. int8/int4 infer.py      weight-only quantization of the merged model
    9. report    report.py     every model measured (evaluation, recall, bits per byte, decode speed)
                               and the report card: OUT/report.md with its curves

It resumes: a stage whose output is finished is skipped, a stopped one continues (--resume), so
running the same command again after Ctrl-C or a crash picks up where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from common import fmt_time, positive_int

ROOT = os.path.dirname(os.path.abspath(__file__))

# The recipes: each stage's flags. tiny fits 2 CPU cores in under an hour; its base knows its
# world's facts (a small world seen many times: 30 people, each fact in ~300 of 23K documents) and
# has begun to copy from context (recall documents, half the text, from the start: the long-context
# stage alone is too short to learn it); 1b is the same pipeline at the released model's size.
RECIPES = {
    "tiny": {
        "pretrain": ["--size", "tiny", "--world-people", "30", "--heldout-frac", "0.25", "--recall-frac", "0.5",
                     "--max-steps", "900"],
        "long": ["--seq-len", "1024", "--batch-tokens", "4096", "--max-steps", "500", "--lr", "1e-3",
                 "--full-attention-idx", "1,3", "--rope-theta", "1e6", "--recall-frac", "0.5"],
        "prune": ["--intermediate-size", "512", "--mamba-num-heads", "6", "--calib-samples", "64",
                  "--distill-steps", "150", "--seq-len", "256"],
        "data": ["--examples", "3000", "--eval-per-cell", "50"],
        "sft": ["--epochs", "4"],
        "dpo": ["--prompts", "512"],
        "report": ["--lengths", "256,512,1024", "--docs", "4", "--split", "train"],
    },
    "1b": {
        "own data": True,  # --data, --conversations and --pairs: the synthetic world is a toy's
        "pretrain": ["--size", "1b"],
        "long": ["--seq-len", "8192", "--batch-tokens", "1048576", "--max-steps", "2000",
                 "--full-attention-idx", ",".join(str(i) for i in range(1, 16, 2)), "--rope-theta", "1e6"],
        "prune": ["--hidden-size", "1536", "--intermediate-size", "6144", "--distill-steps", "2000"],
        "data": [], "sft": [], "dpo": [],
        "report": ["--lengths", "2048,4096,8192", "--docs", "6"],
    },
}


def finished(ckpt):
    """'done' when ckpt holds a finished checkpoint (its lineage's step reached its max_steps, or it
    was not trained step by step), 'stopped' when it holds one of an unfinished run, else None."""
    path = os.path.join(ckpt, "lineage.json")
    if not os.path.isfile(os.path.join(ckpt, "config.json")) or not os.path.isfile(path):
        return None
    with open(path) as f:
        lineage = json.load(f)
    loop = lineage.get("loop", {})
    return "stopped" if "step" in lineage and lineage["step"] < loop.get("max_steps", 0) else "done"


def stage(name, argv, out, ckpt, resume_argv, times):
    """Run `python argv` for one stage unless its output ckpt is finished; continue it with
    resume_argv when a run of it stopped. Records the stage's wall time in times."""
    state = finished(ckpt) if ckpt else ("done" if out and os.path.exists(out) else None)
    if state == "done":
        print(f"[{name}] done already: {ckpt or out}", flush=True)
        return False
    run = resume_argv if state == "stopped" else argv
    print(f"[{name}] {'continuing' if state == 'stopped' else 'running'}: python {' '.join(run)}", flush=True)
    t0 = time.time()
    if subprocess.call([sys.executable] + run, cwd=ROOT) != 0:
        raise SystemExit(f"[{name}] failed; run `python pipeline.py` again to continue from here once it is fixed")
    times[name] = times.get(name, 0) + time.time() - t0
    return True


def save_times(path, times):
    with open(path + ".tmp", "w") as f:
        json.dump(times, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(RECIPES), default="tiny", help="the recipe")
    ap.add_argument("--out", help="the run's directory (default out/pipeline-<size>)")
    ap.add_argument("--data", help="pre-training text: prepared data (data.py) or raw text; default: the synthetic corpus")
    ap.add_argument("--conversations", help="SFT conversations (JSONL); default: instruction data about the synthetic world")
    ap.add_argument("--pairs", help="DPO preference pairs (JSONL); default: pairs from the SFT model's own answers")
    ap.add_argument("--eval", help="an evaluation set of your conversations for the report (default: the world's)")
    ap.add_argument("--nproc", type=positive_int, default=1, help="processes per training stage (torchrun), e.g. the GPUs")
    args = ap.parse_args(argv)
    if RECIPES[args.size].get("own data") and not (args.data and args.conversations and args.pairs):
        ap.error(f"--size {args.size} trains on your data: give --data, --conversations and --pairs")
    out = os.path.abspath(args.out or os.path.join("out", f"pipeline-{args.size}"))
    r, d = RECIPES[args.size], lambda *p: os.path.join(out, *p)  # noqa: E731
    python = ["-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"] if args.nproc > 1 else []
    times_path = d("times.json")
    os.makedirs(out, exist_ok=True)
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    t0 = time.time()
    data = ["--data", args.data] if args.data else []
    conversations = args.conversations or d("data")
    # (stage, command, its output when it is not a training run, its checkpoint when it is, the command that continues it)
    steps = [
        ("pretrain", python + ["train.py", *r["pretrain"], *data, "--out", d("base")], None, d("base", "ckpt"),
         python + ["train.py", "--out", d("base"), "--resume"]),
        ("data", ["tasks.py", "data", "--ckpt", d("base"), *r["data"], "--out", d("data")], d("data", "train.jsonl"),
         None, None),
        ("long", python + ["train.py", "--init-from", d("base"), *r["long"], "--out", d("long")], None,
         d("long", "ckpt"), python + ["train.py", "--out", d("long"), "--resume"]),
        ("prune", python + ["prune.py", "--ckpt", d("long"), *r["prune"], "--out", d("pruned")], None,
         d("pruned", "ckpt"), python + ["prune.py", "--out", d("pruned"), "--resume"]),
        ("sft", python + ["posttrain.py", "sft", "--ckpt", d("pruned"), "--data", conversations, *r["sft"],
                          "--out", d("sft")], None, d("sft", "ckpt"),
         python + ["posttrain.py", "sft", "--out", d("sft"), "--resume"]),
        ("dpo", python + ["posttrain.py", "dpo", "--ckpt", d("sft"), *(["--data", args.pairs] if args.pairs else []),
                          *r["dpo"], "--out", d("dpo")], None, d("dpo", "round1", "ckpt"),
         python + ["posttrain.py", "dpo", "--out", d("dpo"), "--resume"]),
        ("merge", ["merge.py", "--models", d("sft"), d("dpo", "round1"), "--method", "linear", "--out", d("merged")],
         d("merged", "ckpt"), None, None),
        ("int8", ["infer.py", "--ckpt", d("merged"), "--quant", "int8", "--out", d("int8")], d("int8"), None, None),
        ("int4", ["infer.py", "--ckpt", d("merged"), "--quant", "int4", "--out", d("int4")], d("int4"), None, None),
    ]
    if args.conversations:  # your conversations instead of the world's instruction data
        steps = [s for s in steps if s[0] != "data"]
    evaluation = args.eval or d("data")
    report = ["report.py", "--run", out, "--eval", evaluation, *r["report"]]
    for k, (name, argv_, output, ckpt, resume_argv) in enumerate(steps):
        if not stage(name, argv_, output, ckpt, resume_argv, times) and k < len(steps) - 1:
            continue
        save_times(times_path, times)
        t1 = time.time()  # the report card so far: it measures the new model
        if subprocess.call([sys.executable] + report, cwd=ROOT) != 0:
            raise SystemExit(f"[report] failed after {name}; run `python pipeline.py` again once it is fixed")
        times["report"] = times.get("report", 0) + time.time() - t1
        save_times(times_path, times)
    print(f"pipeline: {fmt_time(time.time() - t0)} this time, {fmt_time(sum(times.values()))} in all; the report card: "
          f"{d('report.md')}")


if __name__ == "__main__":
    main()
