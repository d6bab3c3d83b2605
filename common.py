"""
common.py: what every script shares that is not the model. Each piece exists once, here:

  - the device and precision (resolve_device, resolve_dtype, autocast);
  - numeric flags checked where argparse reads them, NaN and infinity included (positive_int, ...);
  - outputs that never touch an input, whatever the path's spelling (check_output), and files
    written atomically (atomic_write, write_jsonl), so that a kill never leaves half a file;
  - progress lines with a count and an ETA for anything that takes more than a few seconds;
  - timing side by side (side_by_side), with the spread that says whether a ratio can be trusted;
  - cli: a script's errors as one sentence and an exit status, never a traceback.

It imports nothing of the project: every other file may import it.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

# -----------------------------------------------------------------------------------------------
# The command line: what a user can cause ends in one sentence

class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM after saving what it had; the message says how to go on."""


def cli(main):
    """Run main(). A user's error (a bad path, flag or file, a NaN loss, a file system that
    refuses a write) ends in one sentence on stderr and exit status 1; an interrupt in 130. Work
    written so far is complete or absent: every file is written atomically."""
    try:
        return main()
    except (OSError, ValueError, FloatingPointError) as e:  # OSError: FileNotFoundError, permissions, a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name="auto"):
    """'auto' -> cuda if present, else mps, else cpu; an unavailable device is one clear error."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, False):
            raise ValueError(f"device {name!r} is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name, device):
    """'auto' -> bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dtypes[name]


def autocast(device, dtype):
    """Mixed precision where it pays (weights fp32, matmuls in dtype); a no-op for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------------------------
# Numeric flags: argparse types, so that every script checks a number where it reads it and the
# error names the flag ("argument --lr: must be a positive number, got nan"). float("nan") and
# float("inf") parse as floats, and every comparison with NaN is False: each check is written so
# that NaN fails it.

def _number(kind, text, ok, what):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not (math.isfinite(v) and ok(v)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return v


def positive_int(text):
    return _number(int, text, lambda v: v > 0, "a positive integer")


def nonneg_int(text):
    return _number(int, text, lambda v: v >= 0, "an integer of 0 or more")


def positive_float(text):
    return _number(float, text, lambda v: v > 0, "a positive number")


def nonneg_float(text):
    return _number(float, text, lambda v: v >= 0, "a number of 0 or more")


def unit_float(text):
    """A fraction from 0 to 1, both included."""
    return _number(float, text, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def finite_float(text):
    return _number(float, text, lambda v: True, "a finite number")


# -----------------------------------------------------------------------------------------------
# Outputs: one check, before any work, that an output can be written and is none of the inputs


def check_output(path, flag, inputs=(), kind="dir"):
    """One clear error, before anything is read or written, when the output `path` (given as
    `flag`) cannot be written or would touch an input. inputs: [(flag, path)], any of them None.

    Paths are compared as the files they are, not as they are spelled: resolved real paths (so a
    symlink, "..", or a trailing slash changes nothing), and device and inode where both exist.
    An output may not be an input, contain one, or lie inside one. kind "dir" or "file": what the
    output must be if it exists; its nearest existing parent must be a writable directory.
    >>> check_output("/tmp/a/b", "--out", [("--ckpt", "/tmp/a")])
    Traceback (most recent call last):
    ValueError: --out /tmp/a/b lies inside --ckpt /tmp/a: write the output somewhere else.
    """
    real = os.path.realpath(path)
    for in_flag, in_path in inputs:
        if in_path is None:
            continue
        src = os.path.realpath(in_path)
        same = real == src or (os.path.exists(path) and os.path.exists(in_path) and os.path.samefile(path, in_path))
        if same:
            why = "is"
        elif real.startswith(src.rstrip(os.sep) + os.sep):
            why = "lies inside"
        elif src.startswith(real.rstrip(os.sep) + os.sep):
            why = "contains"
        else:
            continue
        raise ValueError(f"{flag} {path} {why} {in_flag} {in_path}: write the output somewhere else.")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a file; give a directory.")
        if kind == "file" and os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a directory; give a file name.")
    parent = path if kind == "dir" else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path} cannot be created: {parent} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK) or (kind == "file" and os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written: permission denied in {parent}.")


def atomic_write(path, write):
    """write(tmp_path), then rename over path: a kill mid-write never leaves a half file. The
    file gets the ordinary mode of a new file (0644 under the usual umask), whatever the writer
    made (safetensors writes 0600)."""
    tmp = path + ".tmp"
    write(tmp)
    os.chmod(tmp, 0o666 & ~current_umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the bytes reach the disk before the name does
    os.replace(tmp, path)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_jsonl(path, rows):
    """One JSON object per line, UTF-8 as it is (a person reads these files), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -----------------------------------------------------------------------------------------------
# Progress: a line with a count and an ETA, first within a few seconds, then every `every`.

QUIET = os.environ.get("PLAMO2_QUIET") == "1"  # the tests set it


def fmt_time(s):
    """
    >>> fmt_time(75), fmt_time(3725)
    ('1m15s', '1h02m')
    """
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Progress:
    """Tells a person that a long phase is working and how long is left, on stderr:

        calibration: 64/256 windows (25%) | 0m41s | ETA 2m03s

    update(n) after each piece of work; the line is printed when `first` seconds have passed
    since the start, then every `every` seconds, and once more by done() if any was printed."""

    def __init__(self, what, total, unit="", every=20.0, first=5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.count, self.start = 0, time.time()
        self.next, self.printed = self.start + first, False

    def update(self, n=1):
        self.count += n
        now = time.time()
        if now >= self.next and not QUIET:
            self.next = now + self.every
            self.printed = True
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now):
        elapsed = now - self.start
        pct = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        eta = (f" | ETA {fmt_time(elapsed / self.count * (self.total - self.count))}"
               if self.total and self.count else "")
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.what}: {self.count:,}/{self.total:,}{unit}{pct} | {fmt_time(elapsed)}{eta}"

    def done(self):
        if self.printed and not QUIET:
            print(f"{self.what}: {self.count:,} in {fmt_time(time.time() - self.start)}", file=sys.stderr, flush=True)


def progress(items, what, total=None, unit=""):
    """Iterate over items with a Progress line."""
    p = Progress(what, len(items) if total is None else total, unit)
    for x in items:
        yield x
        p.update()
    p.done()


# -----------------------------------------------------------------------------------------------
# Timing side by side: the functions take turns, round after round, so that a machine that speeds
# up or slows down while they run (shared or throttled cores) affects them all alike.

class Timing:
    """Seconds of one function over the repeats: min, median, max."""

    def __init__(self, times):
        self.times = sorted(times)
        self.min, self.max = self.times[0], self.times[-1]
        self.median = self.times[len(self.times) // 2]

    def spread(self):
        """(max - min) / median: 0 on a quiet machine; above SPREAD_LIMIT a ratio is not to be trusted."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def __repr__(self):
        return f"{self.median * 1e3:.2f} ms (min {self.min * 1e3:.2f}, max {self.max * 1e3:.2f})"


SPREAD_LIMIT = 0.5


def side_by_side(fns, repeats=5, warmup=1, what="timing"):
    """{name: Timing of fn()} for the functions of fns (a dict), interleaved; CUDA is
    synchronised around every call. Prints progress for long runs."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    p = Progress(what, repeats * len(fns), "runs")
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            p.update()
    p.done()
    return {name: Timing(t) for name, t in times.items()}


def spread_warning(timings):
    """A sentence when the repeats of any timing spread too far for its ratios to mean much, else ''."""
    worst = max(timings.values(), key=lambda t: t.spread())
    if worst.spread() <= SPREAD_LIMIT:
        return ""
    return (f"warning: timings spread by up to {100 * worst.spread():.0f}% of their median (min to max over the "
            f"repeats): the machine is busy, and the ratios below are not reliable; run again on an idle machine.")
