"""
The selective scan of PLaMo 2's Mamba layers (the Mamba-2 "SSD" recurrence), three ways.

Glossary (code name -> paper symbol, ARCHITECTURE.md "Mamba mixer"):
    x   (b, l, h, p)  input per head                     x_t
    dt  (b, l, h)     step size after softplus           Δ_t   (> 0)
    A   (h,)          decay rate, negative               A = -exp(A_log)
    B   (b, l, n)     input projection, shared by heads  B_t
    C   (b, l, n)     output projection, shared          C_t
    D   (h,)          skip connection                    D
    S   (b, h, p, n)  state, always fp32                 S_t

    S_t = exp(Δ_t A) S_{t-1} + Δ_t x_t B_tᵀ        y_t = S_t C_t + D x_t

Implementations, all with the same signature and result:
  ssd_reference  a plain loop over time: the ground truth.
  ssd_chunked    the SSD algorithm in PyTorch: quadratic attention-like form inside chunks of
                 length Q, a linear recurrence between chunks. Autograd works through it.
  ssd_triton     Triton kernels for CUDA (forward, backward and the one-token update).
`ssd_scan` picks Triton for CUDA tensors and ssd_chunked elsewhere; set `SCAN_IMPL` to
"reference", "chunked" or "triton" to force a path (tests do). `ssd_step` is the one-token
update used while decoding.
"""

import math
import os
import time

import torch

try:  # Triton is optional: absent on macOS and Windows, and only ever used for CUDA tensors.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SCAN_IMPL = "auto"  # "auto" | "reference" | "chunked" | "triton"


def _check(x, dt, A, B, C, D, initial_state):
    b, l, h, p = x.shape
    n = B.shape[-1]
    assert dt.shape == (b, l, h), f"dt must be (b, l, h) = {(b, l, h)}, got {tuple(dt.shape)}"
    assert A.shape == (h,), f"A must be ({h},), got {tuple(A.shape)}"
    assert B.shape == (b, l, n) and C.shape == (b, l, n), "B and C must both be (b, l, n)"
    assert D is None or D.shape == (h,), f"D must be ({h},), got {tuple(D.shape)}"
    assert initial_state is None or initial_state.shape == (b, h, p, n), \
        f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}"


# -----------------------------------------------------------------------------
# 1. Sequential reference

def ssd_reference(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False):
    """The recurrence exactly as written above, one time step at a time, in fp32.

    >>> x = torch.ones(1, 3, 1, 1); dt = torch.ones(1, 3, 1); A = torch.tensor([-1e9])
    >>> ssd_reference(x, dt, A, torch.ones(1, 3, 1), torch.ones(1, 3, 1)).flatten().tolist()
    [1.0, 1.0, 1.0]

    A very negative decay forgets everything, so y_t = Δ_t x_t B_t C_t = 1.
    """
    _check(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    S = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * A.float())                                   # (b, h)
        S = S * decay[:, :, None, None] + (dtf[:, t, :, None] * xf[:, t])[..., None] \
            * Bf[:, t, None, None, :]                                              # (b, h, p, n)
        ys.append(torch.einsum("bhpn,bn->bhp", S, Cf[:, t]))                       # (b, h, p)
    y = torch.stack(ys, dim=1)                                                     # (b, l, h, p)
    if D is not None:
        y = y + D.float()[:, None] * xf
    y = y.to(x.dtype)
    return (y, S) if return_final_state else y


# -----------------------------------------------------------------------------
# 2. Chunked SSD in PyTorch

def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, chunk_size=64):
    """The SSD algorithm (Mamba-2 paper, section 6) for a single B/C group.

    Split time into chunks of Q steps. With s_i = Σ_{k≤i} Δ_k A (cumulative log-decay inside
    a chunk) the output of position i in chunk c is
        y_i = Σ_{j≤i in c} (C_i·B_j) exp(s_i - s_j) Δ_j x_j    (intra-chunk, a masked matmul)
            + exp(s_i) S_c C_i                                 (the state entering the chunk)
    and the state passed on is S_{c+1} = exp(s_Q) S_c + Σ_j exp(s_Q - s_j) Δ_j x_j B_jᵀ.
    All heavy work is batched matmuls; only the short loop over chunks is sequential.
    """
    _check(x, dt, A, B, C, D, initial_state)
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    pad = (-l) % Q
    xf, dtf, Bf, Cf = x.float(), dt.float(), B.float(), C.float()
    if pad:  # Δ = 0 on padding: decay 1 and no input, so the final state is unchanged.
        xf, dtf, Bf, Cf = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
                           for t in (xf, dtf, Bf, Cf))
    nc = (l + pad) // Q
    xc = xf.view(b, nc, Q, h, p)                                           # (b, c, Q, h, p)
    dtc = dtf.view(b, nc, Q, h)                                            # (b, c, Q, h)
    Bc, Cc = Bf.view(b, nc, Q, n), Cf.view(b, nc, Q, n)                    # (b, c, Q, n)

    s = torch.cumsum(dtc * A.float(), dim=2)                               # (b, c, Q, h)
    # Intra-chunk: decay from j to i, masked to j <= i before exp so nothing overflows.
    seg = s[:, :, :, None, :] - s[:, :, None, :, :]                        # (b, c, Qi, Qj, h)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal[:, :, None], -math.inf))     # (b, c, Qi, Qj, h)
    CB = torch.einsum("bcin,bcjn->bcij", Cc, Bc)                           # (b, c, Qi, Qj)
    scores = CB[..., None] * decay * dtc[:, :, None, :, :]                 # (b, c, Qi, Qj, h)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xc)                     # (b, c, Q, h, p)

    # What each chunk adds to the state, decayed to the chunk's end.
    w = torch.exp(s[:, :, -1:, :] - s) * dtc                               # (b, c, Q, h)
    chunk_states = torch.einsum("bcjh,bcjhp,bcjn->bchpn", w, xc, Bc)       # (b, c, h, p, n)

    # Pass states between chunks: S_c is the state entering chunk c.
    S = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(s[:, :, -1, :])                                # (b, c, h)
    entering = []
    for c in range(nc):
        entering.append(S)
        S = chunk_decay[:, c, :, None, None] * S + chunk_states[:, c]      # (b, h, p, n)
    entering = torch.stack(entering, dim=1)                                # (b, c, h, p, n)
    y = y + torch.einsum("bcin,bchpn,bcih->bcihp", Cc, entering, torch.exp(s))

    y = y.reshape(b, nc * Q, h, p)[:, :l]                                  # (b, l, h, p)
    if D is not None:
        y = y + D.float()[:, None] * xf[:, :l]
    y = y.to(x.dtype)
    return (y, S) if return_final_state else y


# -----------------------------------------------------------------------------
# Dispatch

def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False):
    """The public entry point: Triton on CUDA, the chunked PyTorch scan elsewhere.

    Returns y (b, l, h, p) in x's dtype, and with return_final_state=True also the final
    state (b, h, p, n) in fp32, ready to continue the scan or to decode from.
    """
    impl = SCAN_IMPL
    if impl == "auto":
        impl = "triton" if (x.is_cuda and triton is not None) else "chunked"
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, D, initial_state, return_final_state)
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, D, initial_state, return_final_state)
    if impl == "triton":
        if triton is None:
            raise RuntimeError("SCAN_IMPL='triton' was requested but Triton is not installed.")
        return ssd_triton(x, dt, A, B, C, D, initial_state, return_final_state)
    raise ValueError(f"unknown SCAN_IMPL {impl!r}; use 'auto', 'reference', 'chunked' or 'triton'")


def ssd_step(state, x, dt, A, B, C, D=None):
    """One decoding step: advance the fp32 state in place by one token and return y.

    state (b, h, p, n) fp32, x (b, h, p), dt (b, h), B and C (b, n).  Returns y (b, h, p).
    """
    if x.is_cuda and triton is not None and SCAN_IMPL in ("auto", "triton") or SCAN_IMPL == "triton":
        return ssd_step_triton(state, x, dt, A, B, C, D)
    decay = torch.exp(dt.float() * A.float())                                       # (b, h)
    state.mul_(decay[:, :, None, None]).add_(
        (dt.float()[:, :, None] * x.float())[..., None] * B.float()[:, None, None, :])  # (b, h, p, n)
    y = torch.einsum("bhpn,bn->bhp", state, C.float())                              # (b, h, p)
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# 3. Triton kernels (CUDA; on CPU only through the interpreter, TRITON_INTERPRET=1)

def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False):
    raise NotImplementedError("the Triton scan is being written")


def ssd_step_triton(state, x, dt, A, B, C, D=None):
    raise NotImplementedError("the Triton step is being written")
