"""The SSD scans (kernels.py) against the sequential reference.

Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1 before kernels.py is imported); with one they run on CUDA tensors.
Every implementation must match ssd_reference in the output y, the final state, and the
gradient of every input, for fp32 and bf16 inputs and for sequence lengths that are and are
not multiples of the chunk length.
"""

import math

import pytest
import torch

import kernels

CUDA = torch.cuda.is_available()
# The Triton kernels need CUDA tensors on a GPU machine and CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tensors are tiny: extra intra-op threads only add wake-up latency, which on
    small shared VMs (2 vCPUs) made this file several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


INPUTS = ("x", "dt", "A", "B", "C", "D", "initial_state")
# Tolerances relative to the largest |expected| value of each compared tensor: fp32 is bound
# by accumulation order; bf16 by rounding the outputs and gradients to bf16 (2^-8 ≈ 4e-3).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_inputs(b=2, l=37, h=3, p=16, n=16, dtype=torch.float32, device="cpu", init=True,
                with_D=True, seed=0, A_scale=1.0):
    """Random inputs as the model makes them: x, dt, B, C in the activation dtype; A, D and
    the state in fp32. dt > 0 (post-softplus), A < 0."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    t = {
        "x": r(b, l, h, p),
        "dt": torch.nn.functional.softplus(r(b, l, h) - 2.0) + 0.01,   # ~0.01 .. 1
        "A": -torch.exp(r(h) * 0.5) * A_scale,
        "B": r(b, l, n) / n ** 0.25,
        "C": r(b, l, n) / n ** 0.25,
        "D": r(h) if with_D else None,
        "initial_state": r(b, h, p, n) if init else None,
    }
    for k in ("x", "dt", "B", "C"):
        t[k] = t[k].to(dtype)
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}


def assert_close(actual, expected, tol, name=""):
    expected = expected.float()
    # The floor keeps an all-zero expectation (e.g. dA for l = 1 from a zero state, which
    # cancels exactly in the reference but only to rounding in a chunked form) meaningful.
    scale = max(expected.abs().max().item(), 1e-2)
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def run_with_grads(fn, inputs, gy, gS, upcast=False, seq_idx=None, **kwargs):
    """(y, final_state, {name: grad}) of fn. upcast runs fn on fp32 copies of the inputs (the
    reference for bf16 inputs: same values, exact maths)."""
    leaves = {k: (v.detach().float() if upcast else v.detach()).requires_grad_()
              for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in INPUTS}
    if seq_idx is not None:
        kwargs["seq_idx"] = seq_idx
    y, S = fn(*(args[k] for k in INPUTS), return_final_state=True, **kwargs)
    loss = (y.float() * gy).sum() + (S * gS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, S, dict(zip(leaves, grads))


def upstream_grads(inputs):
    x = inputs["x"]
    b, l, h, p = x.shape
    n = inputs["B"].shape[-1]
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(b, l, h, p, generator=g).to(x.device)      # random upstream gradients
    gS = torch.randn(b, h, p, n, generator=g).to(x.device)
    return gy, gS


def check_against_reference(fn, inputs, dtype, seq_idx=None, **kwargs):
    x = inputs["x"]
    b, l, h, p = x.shape
    n = inputs["B"].shape[-1]
    gy, gS = upstream_grads(inputs)
    y_ref, S_ref, g_ref = run_with_grads(kernels.ssd_reference, inputs, gy, gS, upcast=True, seq_idx=seq_idx)
    y, S, grads = run_with_grads(fn, inputs, gy, gS, seq_idx=seq_idx, **kwargs)

    assert y.dtype == dtype and y.shape == (b, l, h, p)
    assert S.dtype == torch.float32 and S.shape == (b, h, p, n)
    tol = TOL[dtype]
    assert_close(y, y_ref, tol, "y")
    assert_close(S, S_ref, tol, "final state")
    assert set(grads) == set(g_ref)
    for k in grads:
        assert grads[k].dtype == inputs[k].dtype, f"grad of {k} has dtype {grads[k].dtype}"
        assert torch.isfinite(grads[k]).all(), f"grad of {k} is not finite"
        # Gradients of A and D sum over every position: relative to that size they are
        # as exact as the rest, but allow for the longer accumulation.
        assert_close(grads[k], g_ref[k], tol * (4 if k in ("A", "D") else 1), f"grad of {k}")


IMPLS = {
    "chunked": (kernels.ssd_chunked, "cpu"),
    "triton": (kernels.ssd_triton, TRITON_DEVICE),
}


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("l", [1, 37, 64, 130])       # chunk length 64: below, at, across
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_scan_matches_reference(impl, dtype, l, init):
    fn, device = IMPLS[impl]
    inputs = make_inputs(l=l, dtype=dtype, device=device, init=init)
    check_against_reference(fn, inputs, dtype)


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scan_odd_shapes(impl, dtype):
    """p not a multiple of the channel block (40 = 16 + 16 + 8 with block_p=16: three programs
    per head, the last one masked) and n not a power of two (12, padded to 16); no D."""
    fn, device = IMPLS[impl]
    kwargs = {"block_p": 16} if impl == "triton" else {}
    inputs = make_inputs(l=70, h=2, p=40, n=12, dtype=dtype, device=device, with_D=False)
    check_against_reference(fn, inputs, dtype, **kwargs)


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_scan_strong_decay_stays_finite(impl):
    """With Δ A around -50 per step, exp(s_i - s_j) for j > i would overflow to inf (and
    inf * 0 = nan) unless it is masked before the exp."""
    fn, device = IMPLS[impl]
    inputs = make_inputs(l=70, device=device, A_scale=50.0)
    check_against_reference(fn, inputs, torch.float32)


# -----------------------------------------------------------------------------
# Document boundaries (seq_idx) and extreme decays

def packed_seq_idx(b, lengths, device="cpu"):
    """(b, sum(lengths)) document indices: row r holds the documents of lengths, rotated by r
    so that every row has its boundaries elsewhere."""
    rows = []
    for r in range(b):
        order = lengths[r % len(lengths):] + lengths[:r % len(lengths)]
        rows.append(torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(order)]))
    return torch.stack(rows).to(device)


# Boundaries at the first step, at and next to chunk edges (16 and 64), and one-step documents.
LENGTHS = [1, 15, 1, 1, 46, 2, 31, 33]   # 130 steps


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_scan_with_seq_idx_matches_reference(impl, dtype, init):
    fn, device = IMPLS[impl]
    kwargs = {"block_l": 16, "block_p": 16} if impl == "triton" else {"chunk_size": 16}
    inputs = make_inputs(b=2, l=sum(LENGTHS), dtype=dtype, device=device, init=init)
    check_against_reference(fn, inputs, dtype, seq_idx=packed_seq_idx(2, LENGTHS, device), **kwargs)


@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_chunked_blocks_of_a_long_sequence_pass_the_state_on(monkeypatch, init):
    """ssd_chunked cuts long sequences into blocks of _CHUNKED_BLOCK steps: with blocks of 32,
    a boundary falls on a block edge (LENGTHS starts documents at 1, 16, 17, 18, 64, 66 and 97)."""
    monkeypatch.setattr(kernels, "_CHUNKED_BLOCK", 32)
    inputs = make_inputs(b=2, l=sum(LENGTHS), init=init)
    check_against_reference(kernels.ssd_chunked, inputs, torch.float32, seq_idx=packed_seq_idx(2, LENGTHS),
                            chunk_size=16)


@pytest.mark.parametrize("impl", ["reference", "chunked", pytest.param("triton", marks=needs_triton)])
def test_packed_row_equals_each_document_alone(impl):
    """What seq_idx means: a packed row computes what each document computes on its own (the
    initial state belongs to the first one; the final state is the last one's), gradients too."""
    fn, device = {"reference": (kernels.ssd_reference, "cpu"), **IMPLS}[impl]
    lengths = [7, 20, 1, 42]
    inputs = make_inputs(b=1, l=sum(lengths), device=device)
    gy, gS = upstream_grads(inputs)
    y, S, grads = run_with_grads(fn, inputs, gy, gS, seq_idx=packed_seq_idx(1, lengths, device))

    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ys, start = [], 0
    for d, n in enumerate(lengths):
        part = {k: leaves[k][:, start:start + n] for k in ("x", "dt", "B", "C")}
        init = leaves["initial_state"] if d == 0 else None
        y_d, S_d = kernels.ssd_reference(part["x"], part["dt"], leaves["A"], part["B"], part["C"], leaves["D"],
                                         init, return_final_state=True)
        ys.append(y_d)
        start += n
    loss = (torch.cat(ys, 1) * gy).sum() + (S_d * gS).sum()
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    assert_close(y, torch.cat(ys, 1), 1e-4, "y")
    assert_close(S, S_d, 1e-4, "final state")
    for k in grads:
        assert_close(grads[k], expected[k], 4e-4, f"grad of {k}")


def extreme_decays(l, device, seed=0):
    """Inputs whose log-decays add up to about -1e5: ten steps of Δ·A = -1e4 (a learned reset)
    among ordinary ones, and a head whose A is -inf (forgets every step)."""
    inputs = make_inputs(b=1, l=l, h=3, p=16, n=16, device="cpu", seed=seed)
    picks = torch.randperm(l, generator=torch.Generator().manual_seed(seed))[:10]
    inputs["dt"][:, picks] = 1e4 / inputs["A"].abs()
    return {k: v.to(device) for k, v in inputs.items()}


def fp64_reference(inputs, seq_idx=None):
    return kernels.ssd_reference(**{k: v.double() for k, v in inputs.items()}, seq_idx=seq_idx,
                                 return_final_state=True)


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("l", [2048, 32768])
def test_scan_exact_whatever_the_decay(impl, l):
    """Decays summed over spans, never differences of the cumulative log-decay: the result stays
    at float rounding of the fp64 truth when the total log-decay is ~1e5 (a difference of
    cumulative sums there loses ~1e-3), with an infinite decay, and at 32K steps."""
    fn, device = IMPLS[impl]
    inputs = extreme_decays(l, device)
    inputs["A"][1] = -math.inf
    y_ref, S_ref = fp64_reference(inputs)
    y, S = fn(**inputs, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(S).all()
    assert_close(y, y_ref, 1e-6, "y")
    assert_close(S, S_ref, 1e-6, "final state")


@pytest.mark.parametrize("impl", ["chunked", pytest.param("triton", marks=needs_triton)])
def test_scan_gradients_with_large_decays_and_boundaries(impl):
    fn, device = IMPLS[impl]
    kwargs = {"block_l": 16, "block_p": 16} if impl == "triton" else {"chunk_size": 16}
    inputs = extreme_decays(sum(LENGTHS), device, seed=3)
    check_against_reference(fn, inputs, torch.float32, seq_idx=packed_seq_idx(1, LENGTHS, device), **kwargs)


@needs_triton
def test_triton_independent_of_block_sizes():
    inputs = make_inputs(l=50, p=32, device=TRITON_DEVICE)
    y64, S64 = kernels.ssd_triton(**inputs, return_final_state=True)
    y16, S16 = kernels.ssd_triton(**inputs, return_final_state=True, block_l=16, block_p=16)
    assert_close(y16, y64, 1e-5, "y")
    assert_close(S16, S64, 1e-5, "final state")


@needs_triton
def test_triton_only_one_output_used():
    """Backward with an upstream gradient on y only (no final state returned), and on the
    final state only (y unused): the missing gradient counts as zero."""
    inputs = make_inputs(l=40, device=TRITON_DEVICE)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    gy = torch.randn_like(inputs["x"])

    y = kernels.ssd_triton(**leaves)
    y_ref = kernels.ssd_reference(**ref)
    g = torch.autograd.grad((y * gy).sum(), list(leaves.values()))
    g_ref = torch.autograd.grad((y_ref * gy).sum(), list(ref.values()))
    for k, a, e in zip(leaves, g, g_ref):
        assert_close(a, e, 1e-4, f"grad of {k} (y only)")

    _, S = kernels.ssd_triton(**leaves, return_final_state=True)
    _, S_ref = kernels.ssd_reference(**ref, return_final_state=True)
    g = torch.autograd.grad(S.square().sum(), list(leaves.values()))
    # The final state does not depend on C or D: the reference leaves them out of its graph.
    g_ref = torch.autograd.grad(S_ref.square().sum(), list(ref.values()), allow_unused=True)
    for k, a, e in zip(leaves, g, g_ref):
        assert_close(a, torch.zeros_like(a) if e is None else e, 1e-4,
                     f"grad of {k} (final state only)")


@needs_triton
def test_triton_non_contiguous_inputs():
    inputs = make_inputs(l=40, device=TRITON_DEVICE)
    x = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)   # (b, l, h, p), strided
    B = torch.cat([inputs["B"], inputs["C"]], dim=-1)
    inputs.update(x=x, B=B[..., :16], C=B[..., 16:])                # views into one tensor
    assert not inputs["x"].is_contiguous() and not inputs["B"].is_contiguous()
    check_against_reference(kernels.ssd_triton, inputs, torch.float32)


def _round_to_tf32(a):
    """fp32 numpy array rounded (to nearest even) to tf32's 10 mantissa bits."""
    import numpy as np
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return u.view(np.float32)


@needs_triton
@pytest.mark.skipif(CUDA, reason="emulates a GPU's tf32 dots inside Triton's interpreter")
def test_triton_bf16_tf32_dots_are_accurate_enough(monkeypatch):
    """bf16 inputs make the kernels use tf32 dot products (operands rounded to 10 mantissa
    bits). The interpreter computes every dot in fp32, so round the operands here as a GPU
    would, and check that the choice costs no more accuracy than bf16 itself."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        pytest.skip("this Triton's interpreter has no InterpreterBuilder.create_dot to patch")
    exact_dot = builder.create_dot
    rounded = []

    def tf32_dot(self, a, b, acc, input_precision, *args):
        if str(input_precision).upper().endswith("TF32"):     # not "TF32X3" (fp32-exact)
            rounded.append(input_precision)
            a = interpreter.TensorHandle(_round_to_tf32(a.data), a.dtype.scalar)
            b = interpreter.TensorHandle(_round_to_tf32(b.data), b.dtype.scalar)
        return exact_dot(self, a, b, acc, input_precision, *args)

    monkeypatch.setattr(builder, "create_dot", tf32_dot)
    inputs = make_inputs(b=1, l=130, h=2, p=64, n=64, dtype=torch.bfloat16)
    check_against_reference(kernels.ssd_triton, inputs, torch.bfloat16)
    assert rounded, "the bf16 path did not ask for tf32 dots"


# -----------------------------------------------------------------------------
# Chunk size of the PyTorch scan

@pytest.mark.parametrize("l", [37, 130])
def test_chunk_size_does_not_change_results(l):
    inputs = make_inputs(l=l)
    y_ref, S_ref = kernels.ssd_chunked(**inputs, return_final_state=True, chunk_size=64)
    for q in (1, 16, 32, 128, 256):
        y, S = kernels.ssd_chunked(**inputs, return_final_state=True, chunk_size=q)
        assert_close(y, y_ref, 1e-5, f"y, chunk_size={q}")
        assert_close(S, S_ref, 1e-5, f"final state, chunk_size={q}")


def test_empty_sequence():
    inputs = make_inputs(l=0)
    y, S = kernels.ssd_chunked(**inputs, return_final_state=True)
    assert y.shape == (2, 0, 3, 16) and torch.equal(S, inputs["initial_state"])


# -----------------------------------------------------------------------------
# One-token decoding step

def _step_through(step, inputs):
    """Run step token by token from inputs' initial state; return (stacked y, final state)."""
    x, dt, A, B, C, D, S0 = (inputs[k] for k in INPUTS)
    b, l, h, p = x.shape
    n = B.shape[-1]
    state = S0.clone() if S0 is not None else torch.zeros(b, h, p, n, device=x.device)
    ys = [step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(l)]
    return torch.stack(ys, dim=1), state


STEP_IMPLS = {
    "pytorch": (kernels.ssd_step, "cpu"),
    "triton": (kernels.ssd_step_triton, TRITON_DEVICE),
}


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("init", [False, True], ids=["zero_state", "initial_state"])
def test_step_matches_reference(impl, dtype, init):
    step, device = STEP_IMPLS[impl]
    # p = 40, n = 12: a partial channel block is not needed here (no tl.dot), but odd sizes
    # still exercise the masks.
    inputs = make_inputs(l=20, p=40, n=12, dtype=dtype, device=device, init=init)
    y, S = _step_through(step, inputs)
    y_ref, S_ref = kernels.ssd_reference(
        **{k: (v.float() if v is not None else None) for k, v in inputs.items()},
        return_final_state=True)
    assert y.dtype == dtype and S.dtype == torch.float32
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(S, S_ref, 1e-5, "state")        # the state is fp32 whatever the inputs


@needs_triton
def test_step_triton_updates_non_contiguous_state_in_place():
    inputs = make_inputs(l=1, device=TRITON_DEVICE)
    x, dt, A, B, C, D, S0 = (inputs[k] for k in INPUTS)
    state = S0.transpose(2, 3).contiguous().transpose(2, 3)      # same values, strided
    assert not state.is_contiguous()
    y = kernels.ssd_step_triton(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_ref, S_ref = kernels.ssd_reference(**inputs, return_final_state=True)
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, S_ref, 1e-5, "state")


# -----------------------------------------------------------------------------
# Dispatch

@pytest.fixture
def spies(monkeypatch):
    """Replace the four scan implementations by recorders; returns the list of calls."""
    calls = []
    for name in ("ssd_reference", "ssd_chunked", "ssd_triton", "ssd_step_triton"):
        monkeypatch.setattr(kernels, name, lambda *a, _name=name, **k: calls.append(_name) or _name)
    return calls


@pytest.mark.parametrize("impl,expected", [("reference", "ssd_reference"),
                                           ("chunked", "ssd_chunked"),
                                           ("triton", "ssd_triton")])
def test_dispatch_override(monkeypatch, spies, impl, expected):
    monkeypatch.setattr(kernels, "triton", kernels.triton or object())   # "installed"
    monkeypatch.setattr(kernels, "SCAN_IMPL", impl)
    assert kernels.ssd_scan(**make_inputs(l=4)) == expected
    assert spies == [expected]


def test_dispatch_auto_on_cpu_is_chunked(monkeypatch, spies):
    monkeypatch.setattr(kernels, "SCAN_IMPL", "auto")
    assert kernels.ssd_scan(**make_inputs(l=4)) == "ssd_chunked"


@needs_cuda
def test_dispatch_auto_on_cuda_is_triton(monkeypatch, spies):
    monkeypatch.setattr(kernels, "SCAN_IMPL", "auto")
    assert kernels.ssd_scan(**make_inputs(l=4, device="cuda")) == "ssd_triton"


def test_dispatch_unknown_raises(monkeypatch):
    monkeypatch.setattr(kernels, "SCAN_IMPL", "cuda-magic")
    with pytest.raises(ValueError, match="cuda-magic"):
        kernels.ssd_scan(**make_inputs(l=4))


def test_dispatch_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "SCAN_IMPL", "triton")
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels.ssd_scan(**make_inputs(l=4))


def test_dispatch_step(monkeypatch, spies):
    inputs = make_inputs(l=1)
    x, dt, A, B, C, D, S0 = (inputs[k] for k in INPUTS)
    args = (S0.clone(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    monkeypatch.setattr(kernels, "SCAN_IMPL", "triton")
    assert kernels.ssd_step(*args) == "ssd_step_triton"
    monkeypatch.setattr(kernels, "SCAN_IMPL", "auto")                    # CPU: PyTorch
    assert isinstance(kernels.ssd_step(*args), torch.Tensor)
    assert spies == ["ssd_step_triton"]


def test_scan_public_entry_point_end_to_end(monkeypatch):
    """ssd_scan itself (not a spy) on CPU: the chunked path, same answer as the reference."""
    monkeypatch.setattr(kernels, "SCAN_IMPL", "auto")
    inputs = make_inputs(l=37)
    y, S = kernels.ssd_scan(**inputs, return_final_state=True)
    y_ref, S_ref = kernels.ssd_reference(**inputs, return_final_state=True)
    assert_close(y, y_ref, 1e-4, "y")
    assert_close(S, S_ref, 1e-4, "final state")


# -----------------------------------------------------------------------------
# Real GPU only: the released model's shapes

@needs_cuda
@needs_triton
@pytest.mark.parametrize("packed", [False, True], ids=["one_document", "packed"])
def test_triton_cuda_released_shapes_bf16(packed):
    """h=32, p=128, n=64 (two channel blocks per head), l=512, bf16: Triton (tf32 dots) vs
    the chunked PyTorch scan, outputs and gradients, with and without document boundaries."""
    torch.manual_seed(0)
    inputs = make_inputs(b=2, l=512, h=32, p=128, n=64, dtype=torch.bfloat16, device="cuda")
    seq_idx = packed_seq_idx(2, [100, 1, 63, 64, 284], "cuda") if packed else None
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(2, 512, 32, 128, generator=g).cuda()
    gS = torch.randn(2, 32, 128, 64, generator=g).cuda()
    y_ref, S_ref, g_ref = run_with_grads(kernels.ssd_chunked, inputs, gy, gS, upcast=True, seq_idx=seq_idx)
    y, S, grads = run_with_grads(kernels.ssd_triton, inputs, gy, gS, seq_idx=seq_idx)
    assert_close(y, y_ref, 2e-2, "y")
    assert_close(S, S_ref, 1e-2, "final state")
    for k in grads:
        assert_close(grads[k], g_ref[k], 2e-2 * (4 if k in ("A", "D") else 1), f"grad of {k}")


@needs_cuda
@needs_triton
def test_triton_cuda_fp32_is_ieee_exact():
    """fp32 inputs use true fp32 dots on the GPU (no tf32): reference-level accuracy."""
    inputs = make_inputs(l=300, h=4, p=128, n=64, device="cuda")
    check_against_reference(kernels.ssd_triton, inputs, torch.float32)
