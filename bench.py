"""
bench.py: the measurements, in one place: the scans' speed (`python bench.py scans`, on any
device), and the GPU report, everything we want to know from a GPU in one command:

    python bench.py gpu --budget 600 [--mamba-ssm PATH]

It runs these parts in order, each in its own process with a time limit from what is left of
the budget, each skipped with the reason when what it needs is missing, and prints one table at
the end (every part's figures as they came, side by side from one run):

  1. grid: the Triton scans against the sequential fp64 reference, fp32 and bf16, outputs, final
     states and every gradient, lengths up to 8K, with document boundaries; and the CUDA-only
     tests (pytest -k cuda);
  2. scans: Triton forward and forward+backward against the chunked PyTorch scan at the 1b
     preset's Mamba shapes (h=32, p=128, n=64, bf16, b=8, L=2048 and 8192), the forward's
     bandwidth against the GPU's measured copy bandwidth, and state-spaces/mamba's own Triton SSD
     (mamba_chunk_scan_combined) on the same shapes when --mamba-ssm names its source directory
     (the sdist's files need no CUDA build; the machine may have no network);
  3. train: the small preset's training tokens/s and MFU in bf16, with the Triton scan and with
     the chunked one (what Triton buys); the 1b preset for a few steps, under FSDP if several
     GPUs are there, else on one GPU at a short sequence;
  4. infer: prefill and decode of the 1b preset in fp32, bf16, int8 and int4.

Without a GPU, `python bench.py gpu` runs the parts that can run (the grid at small shapes
through Triton's interpreter) and says why it skips the rest; the tests run it that way.
"""
import argparse
import os
import subprocess
import sys
import time
import types

import torch

import kernels
from common import Timing, side_by_side, spread_warning

ROOT = os.path.dirname(os.path.abspath(__file__))
PARTS = ["grid", "scans", "train", "infer"]


# -----------------------------------------------------------------------------------------------
# 1. grid: the Triton scans against the reference

def scan_inputs(b, l, h, p, n, dtype, device, seed=0, packed=False):
    """Random scan inputs as the model makes them (x, dt, B, C in dtype; A, D, the state in fp32),
    and document boundaries (seq_idx) when packed."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = dict(x=r(b, l, h, p).to(dtype), dt=(torch.nn.functional.softplus(r(b, l, h) - 2.0) + 0.01).to(dtype),
             A=-torch.exp(r(h) * 0.5), B=(r(b, l, n) / n ** 0.25).to(dtype), C=(r(b, l, n) / n ** 0.25).to(dtype),
             D=r(h), initial_state=r(b, h, p, n))
    t = {k: v.to(device) for k, v in t.items()}
    seq_idx = None
    if packed and l > 2:
        cuts = torch.tensor(sorted({1, l // 3, l // 2, l - 1}))
        seq_idx = torch.zeros(b, l, dtype=torch.long)
        for c in cuts.tolist():
            seq_idx[:, c:] += 1
        seq_idx = seq_idx.to(device)
    return t, seq_idx


def grads_of(fn, inputs, seq_idx, upcast):
    """(y, final state, {name: gradient}) of fn against fixed random upstream gradients."""
    leaves = {k: (v.detach().double() if upcast else v.detach()).requires_grad_() for k, v in inputs.items()}
    y, S = fn(**leaves, return_final_state=True, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g).to(y.device, y.dtype)
    gS = torch.randn(S.shape, generator=g).to(S.device, S.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (S * gS).sum(), list(leaves.values()))
    return y, S, dict(zip(leaves, grads))


def grid(small=False):
    """Max relative error of every output and gradient of the Triton scan against the fp64
    reference, per dtype and length, with document boundaries; the tolerance each must meet."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = dict(b=1, h=2, p=16, n=8) if small else dict(b=2, h=8, p=64, n=32)
    lengths = [1, 37, 130] if small else [1, 130, 2048, 8192]
    rows, ok = [], True
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for l in lengths:
            inputs, seq_idx = scan_inputs(l=l, dtype=dtype, device=device, packed=True, **shapes)
            ref = grads_of(kernels.ssd_reference, inputs, seq_idx, upcast=True)
            got = grads_of(kernels.ssd_triton, inputs, seq_idx, upcast=False)
            errors = {"y": rel(got[0], ref[0]), "state": rel(got[1], ref[1]),
                      **{f"d{k}": rel(got[2][k], ref[2][k]) for k in got[2]}}
            worst = max(errors, key=errors.get)
            passed = all(e <= tol * (4 if k in ("dA", "dD") else 1) for k, e in errors.items())
            ok &= passed
            rows.append(f"{str(dtype)[6:]:>8} L={l:<5} worst {worst} {errors[worst]:.1e} (tolerance {tol:g}) "
                        f"{'ok' if passed else 'FAILED'}")
    return ok, rows


def rel(a, b):
    """max |a - b| relative to max |b| (floored at 1e-2, as the tests do)."""
    return ((a.double() - b.double()).abs().max() / max(b.abs().max().item(), 1e-2)).item()


# -----------------------------------------------------------------------------------------------
# 2. scans: speed at the released shapes

def import_mamba_ssm(path):
    """mamba_chunk_scan_combined from state-spaces/mamba's source directory (the one holding
    mamba_ssm/): its Triton files only, without the package's __init__, which imports the CUDA
    extensions a source distribution does not have built."""
    for name, sub in (("mamba_ssm", "mamba_ssm"), ("mamba_ssm.ops", "mamba_ssm/ops")):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(path, sub)]
        sys.modules[name] = module
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


def scan_speed(lengths=(2048, 8192), b=8, h=32, p=128, n=64, dtype=torch.bfloat16, mamba_ssm=None, repeats=10):
    """Median times of the scans, forward and forward+backward, and the Triton forward's bandwidth."""
    device = "cuda"
    theirs = import_mamba_ssm(mamba_ssm) if mamba_ssm else None
    copy = copy_bandwidth(device)
    rows, figures = [f"GPU {torch.cuda.get_device_name()}, copy bandwidth {copy / 1e9:.0f} GB/s, "
                     f"b={b} h={h} p={p} n={n} {str(dtype)[6:]}"], {}
    for l in lengths:
        inputs, _ = scan_inputs(b, l, h, p, n, dtype, device)
        scans = {"triton": kernels.ssd_triton, "chunked": kernels.ssd_chunked}
        if theirs:  # ngroups = 1: B and C shared by every head, as in PLaMo 2
            scans["mamba_ssm"] = lambda x, dt, A, B, C, D, initial_state, **k: theirs(
                x, dt, A, B[:, :, None], C[:, :, None], chunk_size=256, D=D, initial_states=initial_state)
        t = side_by_side({(name, mode): run for name, scan in scans.items()
                          for mode, run in timed_scan(scan, inputs).items()}, repeats=repeats, warmup=3)
        moved = sum(inputs[k].numel() * inputs[k].element_size() for k in ("x", "dt", "B", "C", "x"))
        bw = moved / t["triton", "fwd"].median
        figures[l] = {f"{name} {mode}": t[name, mode].median for name, mode in t}
        figures[l]["bandwidth"] = bw / copy
        rows.append(f"L={l}: forward triton {ms(t['triton', 'fwd'])} chunked {ms(t['chunked', 'fwd'])} "
                    f"({t['chunked', 'fwd'].median / t['triton', 'fwd'].median:.1f}x); forward+backward triton "
                    f"{ms(t['triton', 'fwd+bwd'])} chunked {ms(t['chunked', 'fwd+bwd'])} "
                    f"({t['chunked', 'fwd+bwd'].median / t['triton', 'fwd+bwd'].median:.1f}x, goal 3x); forward "
                    f"bandwidth {bw / 1e9:.0f} GB/s = {100 * bw / copy:.0f}% of copy (goal 60%)")
        if theirs:
            rows.append(f"L={l}: ours / mamba_ssm: forward {t['triton', 'fwd'].median / t['mamba_ssm', 'fwd'].median:.2f}, "
                        f"forward+backward {t['triton', 'fwd+bwd'].median / t['mamba_ssm', 'fwd+bwd'].median:.2f} "
                        f"(below 1: ours is faster)")
        warning = spread_warning(t)
        if warning:
            rows.append(warning)
    return True, rows


def timed_scan(scan, inputs):
    """{"fwd": forward without autograd, "fwd+bwd": forward and backward of every input}."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}

    def forward():
        with torch.no_grad():
            scan(**inputs)

    def forward_backward():
        y = scan(**leaves)
        y = y[0] if isinstance(y, tuple) else y
        torch.autograd.grad(y.float().square().sum(), list(leaves.values()), allow_unused=True)
    return {"fwd": forward, "fwd+bwd": forward_backward}


def copy_bandwidth(device, nbytes=2 << 30):
    """Achievable memory bandwidth in bytes/s: a large device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / side_by_side({"copy": lambda: dst.copy_(src)}, repeats=10, warmup=3)["copy"].median


def cpu_scans(seq_len=2048, batches=(1, 2, 4), h=8, p=64, n=32, lengths=(2048, 8192, 32768)):
    """The chunked scan against the sequential reference at the tiny preset's shapes, fp32, on
    CPU; then the chunked scan alone at longer sequences: its cost per token stays flat."""
    rows = [f"CPU ({torch.get_num_threads()} threads), fp32, L={seq_len}, h={h}, p={p}, n={n}: ssd_chunked vs "
            f"ssd_reference, min/median/max of 5, interleaved"]
    for b in batches:
        inputs, _ = scan_inputs(b, seq_len, h, p, n, torch.float32, "cpu")
        t = side_by_side({(name, mode): run for name, scan in (("ref", kernels.ssd_reference),
                                                               ("chunked", kernels.ssd_chunked))
                          for mode, run in timed_scan(scan, inputs).items()}, repeats=5)
        rows.append(f"b={b}: forward {ms(t['ref', 'fwd'])} vs {ms(t['chunked', 'fwd'])} "
                    f"({t['ref', 'fwd'].median / t['chunked', 'fwd'].median:.1f}x); forward+backward "
                    f"{ms(t['ref', 'fwd+bwd'])} vs {ms(t['chunked', 'fwd+bwd'])} "
                    f"({t['ref', 'fwd+bwd'].median / t['chunked', 'fwd+bwd'].median:.1f}x)")
        rows += [w for w in [spread_warning(t)] if w]
    for l in lengths:
        inputs, _ = scan_inputs(1, l, h, p, n, torch.float32, "cpu")
        t = side_by_side(timed_scan(kernels.ssd_chunked, inputs), repeats=3)
        rows.append(f"ssd_chunked, b=1, L={l}: forward {ms(t['fwd'])} ({t['fwd'].median * 1e6 / l:.2f} ms per 1K tokens), "
                    f"forward+backward {ms(t['fwd+bwd'])} ({t['fwd+bwd'].median * 1e6 / l:.2f} ms per 1K tokens)")
    return True, rows


def ms(t: Timing):
    return f"{t.median * 1e3:.2f} ms"


# -----------------------------------------------------------------------------------------------
# 3, 4. train and infer: the scripts' own --bench modes, and a few steps of the 1b preset

def script(argv, env=None, timeout=None):
    """The output of `python argv` run from the repository, or the reason it did not finish."""
    try:
        p = subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, [f"stopped after {timeout:.0f} s (the budget)"]
    lines = (p.stdout + p.stderr).strip().splitlines()
    return p.returncode == 0, lines[-12:] if p.returncode else lines


def train_part(timeout):
    rows = []
    for name, env in (("Triton scan", {}), ("chunked scan (PLAMO2_SCAN=chunked)", {"PLAMO2_SCAN": "chunked"})):
        ok, lines = script(["train.py", "--bench", "--size", "small", "--dtype", "bfloat16"], env, timeout / 4)
        rows += [f"small, {name}:"] + [line for line in lines if ok and ("tok/s" in line or "/ plain" in line)] \
            + ([] if ok else ["failed:"] + lines)
    gpus = torch.cuda.device_count()
    steps = ["--size", "1b", "--vocab-size", "32000", "--corpus-bytes", "20000000", "--max-steps", "4",
             "--eval-every", "4", "--eval-tokens", "65536", "--out", os.path.join(ROOT, "out", "bench-1b")]
    if gpus > 1:
        argv = ["-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "train.py", "--fsdp", "--overwrite"] + steps
        label = f"1b under FSDP on {gpus} GPUs"
    else:
        argv = ["train.py", "--seq-len", "512", "--batch-tokens", "16384", "--micro-batch", "8", "--overwrite"] + steps
        label = "1b on one GPU, 512-token sequences"
    ok, lines = script(argv, timeout=timeout / 2)
    rows += [f"{label}:"] + ([line for line in lines if line.startswith("step ")] if ok else lines)
    return True, rows


def infer_part(timeout):
    rows = []
    for dtype in ("float32", "bfloat16"):
        ok, lines = script(["infer.py", "--bench", "--size", "1b", "--dtype", dtype], timeout=timeout / 2)
        rows += [f"infer.py --bench --size 1b --dtype {dtype}:"] + lines
    return True, rows


# -----------------------------------------------------------------------------------------------
# The report

def run_part(name, args, timeout):
    """(ran, ok, lines) of one part: in this process for the grid on CPU (the tests' case), else in
    its own process, so that a part that hangs or crashes costs only its own share of the budget."""
    cuda = torch.cuda.is_available()
    if name != "grid" and not cuda:
        return False, True, ["skipped: no CUDA GPU"]
    if name == "grid" and kernels.triton is None:
        return False, True, ["skipped: Triton is not installed"]
    if name == "scans" and args.mamba_ssm and not os.path.isdir(os.path.join(args.mamba_ssm, "mamba_ssm")):
        return False, False, [f"--mamba-ssm {args.mamba_ssm} holds no mamba_ssm/ directory"]
    if not cuda:  # the grid through Triton's interpreter, at small shapes
        ok, rows = grid(small=True)
        return True, ok, rows
    if name == "train":
        return (True, *train_part(timeout))
    if name == "infer":
        return (True, *infer_part(timeout))
    argv = ["bench.py", "gpu", "--part-only", name] + (["--mamba-ssm", args.mamba_ssm] if args.mamba_ssm else [])
    ok, lines = script(argv, timeout=timeout)
    if name == "grid":
        tests_ok, tests = script(["-m", "pytest", "-q", "tests/test_kernels.py", "-k", "cuda"], timeout=timeout / 2)
        lines += ["CUDA-only tests: " + (tests[-1] if tests else "no output")]
        ok &= tests_ok
    return True, ok, lines


def gpu_report(args):
    start, results = time.time(), {}
    print(f"bench.py gpu: budget {args.budget:.0f} s; torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA GPU'}, "
          f"Triton {'installed' if kernels.triton else 'missing'}", flush=True)
    for i, name in enumerate(PARTS):
        left = args.budget - (time.time() - start)
        if left < 10:
            results[name] = (False, True, ["skipped: the budget is spent"])
            continue
        share = left / (len(PARTS) - i) if name != "grid" else min(left, max(left / len(PARTS), 120))
        t0 = time.time()
        results[name] = run_part(name, args, share)
        print(f"[{name}] {time.time() - t0:.0f} s", flush=True)
        for line in results[name][2]:
            print(f"  {line}", flush=True)
    print("\n| part | ran | result |\n|---|---|---|")
    for name, (ran, ok, lines) in results.items():
        print(f"| {name} | {'yes' if ran else 'no'} | {'ok' if ok else 'FAILED'}: {'; '.join(lines[:3])} |")
    return all(ok for _, ok, _ in results.values())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Benchmarks: the scans (python bench.py scans) and the GPU report "
                                             "(python bench.py gpu --budget 600).")
    ap.add_argument("what", choices=["gpu", "scans"], help="gpu: the whole report; scans: the scans' speed")
    ap.add_argument("--budget", type=float, default=600, help="gpu: seconds for the whole report")
    ap.add_argument("--mamba-ssm", help="the directory of state-spaces/mamba's source (holding mamba_ssm/), to "
                                        "compare its Triton SSD on the same shapes")
    ap.add_argument("--part-only", choices=PARTS, help=argparse.SUPPRESS)  # one part, in its own process
    ap.add_argument("--seq-len", type=int, default=2048, help="scans: sequence length on CPU")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4], help="scans: batch sizes on CPU")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.part_only == "grid":
        ok, rows = grid()
    elif args.part_only == "scans":
        ok, rows = scan_speed(mamba_ssm=args.mamba_ssm)
    elif args.what == "scans":
        ok, rows = cpu_scans(args.seq_len, args.batch)
        if torch.cuda.is_available():
            rows += scan_speed(mamba_ssm=args.mamba_ssm)[1]
    else:
        ok, rows = gpu_report(args), []
    for r in rows:
        print(r)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
