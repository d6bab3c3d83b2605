"""
The selective scan of PLaMo 2's Mamba layers (the Mamba-2 "SSD" recurrence), three ways.

Glossary (code name -> paper symbol; plamo2.py's Mamba class computes them):
    x   (b, l, h, p)  input per head                     x_t
    dt  (b, l, h)     step size after softplus           Δ_t   (> 0)
    A   (h,)          decay rate, negative               A = -exp(A_log)
    B   (b, l, n)     input projection, shared by heads  B_t
    C   (b, l, n)     output projection, shared          C_t
    D   (h,)          skip connection                    D
    S   (b, h, p, n)  state, always fp32                 S_t
    a   (b, l, h)     log-decay of a step                a_t = Δ_t A  (<= 0)
    seq_idx (b, l)    document of each token in a packed row (non-decreasing)

    S_t = exp(a_t) S_{t-1} + Δ_t x_t B_tᵀ        y_t = S_t C_t + D x_t

Where seq_idx changes (a new document starts), the state is reset: S_{t-1} is replaced by 0,
which is the same as a_t = -inf. Every implementation writes the boundary that way, and stays
exact with it, because decays are always summed directly over the steps they span, never taken
as the difference of two long cumulative sums (which loses precision once the sums are large and
gives -inf - -inf = NaN at a boundary).

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

import torch
import torch.nn.functional as F

try:  # Triton is optional: absent on macOS and Windows, and only ever used for CUDA tensors.
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SCAN_IMPL = os.environ.get("PLAMO2_SCAN", "auto")  # "auto" | "reference" | "chunked" | "triton"


def _check(x, dt, A, B, C, D, initial_state, seq_idx):
    b, l, h, p = x.shape
    n = B.shape[-1]
    assert dt.shape == (b, l, h), f"dt must be (b, l, h) = {(b, l, h)}, got {tuple(dt.shape)}"
    assert A.shape == (h,), f"A must be ({h},), got {tuple(A.shape)}"
    assert B.shape == (b, l, n) and C.shape == (b, l, n), "B and C must both be (b, l, n)"
    assert D is None or D.shape == (h,), f"D must be ({h},), got {tuple(D.shape)}"
    assert initial_state is None or initial_state.shape == (b, h, p, n), \
        f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}"
    assert seq_idx is None or (seq_idx.shape == (b, l) and not seq_idx.is_floating_point()), \
        f"seq_idx must be an integer tensor (b, l) = {(b, l)}, got {tuple(seq_idx.shape)} {seq_idx.dtype}"


def segment_starts(seq_idx):
    """(b, l) bool, True where a new document begins: seq_idx differs from the step before.
    Position 0 never begins one (an initial state belongs to the row's first document).

    >>> segment_starts(torch.tensor([[0, 0, 1, 1, 1, 2]])).int().tolist()
    [[0, 0, 1, 0, 0, 1]]
    """
    return F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))


# -----------------------------------------------------------------------------
# 1. Sequential reference

def ssd_reference(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, seq_idx=None):
    """The recurrence exactly as written above, one time step at a time, in fp32 (fp64 when x
    is fp64: the tests' ground truth).

    >>> x = torch.ones(1, 3, 1, 1); dt = torch.ones(1, 3, 1); A = torch.tensor([-1e9])
    >>> ssd_reference(x, dt, A, torch.ones(1, 3, 1), torch.ones(1, 3, 1)).flatten().tolist()
    [1.0, 1.0, 1.0]

    A very negative decay forgets everything, so y_t = Δ_t x_t B_t C_t = 1. So does a new
    document: with A = 0 the state adds up, except where seq_idx says a document starts.
    >>> ssd_reference(x, dt, A * 0, torch.ones(1, 3, 1), torch.ones(1, 3, 1),
    ...               seq_idx=torch.tensor([[0, 0, 1]])).flatten().tolist()
    [1.0, 2.0, 1.0]
    """
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = torch.promote_types(x.dtype, torch.float32)
    xf, dtf, Af, Bf, Cf = x.to(f), dt.to(f), A.to(f), B.to(f), C.to(f)
    S = x.new_zeros(b, h, p, n, dtype=f) if initial_state is None else initial_state.to(f)
    starts = segment_starts(seq_idx) if seq_idx is not None else None
    ys = []
    for t in range(l):
        if starts is not None:  # a new document: forget the previous one
            S = S * (~starts[:, t]).to(f)[:, None, None, None]
        decay = torch.exp(dtf[:, t] * Af)                                          # (b, h)
        S = S * decay[:, :, None, None] + (dtf[:, t, :, None] * xf[:, t])[..., None] \
            * Bf[:, t, None, None, :]                                              # (b, h, p, n)
        ys.append(torch.einsum("bhpn,bn->bhp", S, Cf[:, t]))                       # (b, h, p)
    y = torch.stack(ys, dim=1)                                                     # (b, l, h, p)
    if D is not None:
        y = y + D.to(f)[:, None] * xf
    y = y.to(x.dtype)
    return (y, S) if return_final_state else y


# -----------------------------------------------------------------------------
# 2. Chunked SSD in PyTorch

def span_sums(a):
    """Sums over spans of the last axis: out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i
    (0 on the diagonal: an empty span), and 0 for j > i, pairs the caller masks out. With a the
    log-decays, exp(out[i, j]) is the decay from step j to step i. Each entry is summed directly,
    as Mamba-2's segsum does: a difference of cumulative sums s_i - s_j would carry the rounding
    error of s_i (large once any decay is), and a boundary's -inf would give -inf - -inf = NaN.

    >>> span_sums(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [5.0, 3.0, 0.0]]
    """
    Q = a.shape[-1]
    below = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)     # d > j
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~below, 0.0)     # [d, j] = a_d if d > j
    return terms.cumsum(-2)                                                   # [i, j] = Σ_{j<d<=i} a_d


_CHUNKED_BLOCK = 8192  # steps per block of ssd_chunked; results do not depend on it


def ssd_chunked(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, chunk_size=64,
                seq_idx=None):
    """The SSD algorithm (Mamba-2 paper, section 6) for a single B/C group.

    Split time into chunks of Q steps. Inside a chunk, with decay(i, j) = exp(a_{j+1} + ... + a_i),
    the output of position i is
        y_i = Σ_{j≤i in the chunk} (C_i·B_j) decay(i, j) Δ_j x_j    (intra-chunk: a masked matmul)
            + decay(i, start) C_i·S_c                              (the state entering the chunk)
    and the state passed on is S_{c+1} = decay(end, start) S_c + Σ_j decay(end, j) Δ_j x_j B_jᵀ.
    All heavy work is batched matmuls over (batch, head, chunk); only the loop that passes the
    state from chunk to chunk is sequential, and it is linear in their number. A long sequence
    goes through in blocks of _CHUNKED_BLOCK steps, each starting from the state the last one
    left: the same work per token, and each block's intermediates stay in the CPU's caches.
    """
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    a = dt.float() * A.float()                                             # (b, l, h) log-decays
    if seq_idx is not None:  # a new document: decay -inf, the state before it is forgotten
        a = a.masked_fill(segment_starts(seq_idx)[..., None], -math.inf)
    S = initial_state.float() if initial_state is not None else \
        x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float32)
    ys = [x.new_zeros(x.shape, dtype=torch.float32)[:, :0]]               # an empty sequence: no steps
    for t in range(0, x.shape[1], _CHUNKED_BLOCK):
        span = slice(t, t + _CHUNKED_BLOCK)
        y, S = _ssd_chunks(x[:, span], dt[:, span], a[:, span], B[:, span], C[:, span], S, chunk_size)
        ys.append(y)
    y = torch.cat(ys, dim=1)                                               # (b, l, h, p)
    if D is not None:
        y = torch.addcmul(y, x.float(), D.float()[:, None])
    y = y.to(x.dtype)
    return (y, S) if return_final_state else y


def _ssd_chunks(x, dt, a, B, C, S, Q):
    """ssd_chunked's work on one block: (y without the D term, fp32 (b, l, h, p); final state),
    from the log-decays a (b, l, h) and the entering state S (b, h, p, n)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    pad = (-l) % Q
    xdt = x.float() * dt.float()[..., None]                                # Δ_j x_j (b, l, h, p)
    Bf, Cf = B.float(), C.float()
    if pad:  # a = 0 and no input on padding: decay 1, so the final state is unchanged
        xdt, a, Bf, Cf = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, a, Bf, Cf))
    nc = (l + pad) // Q
    # Every matmul below is batched over (batch, head, chunk), flattened into one axis "bhc".
    X = xdt.view(b, nc, Q, h, p).permute(0, 3, 1, 2, 4).reshape(b * h * nc, Q, p)  # (bhc, Q, p)
    Bc, Cc = Bf.view(b, nc, Q, n), Cf.view(b, nc, Q, n)                    # (b, c, Q, n)
    ac = a.view(b, nc, Q, h).permute(0, 3, 1, 2)                           # (b, h, c, Q)
    spans = span_sums(ac)                                                  # (b, h, c, Qi, Qj)
    from_start = ac.cumsum(-1)                                             # (b, h, c, Q) start -> i

    # Intra-chunk: y_i = Σ_j (C_i·B_j) decay(i, j) Δ_j x_j; the causal mask lives in C·B,
    # which is shared by the heads and so 1/h the size of the decays.
    CB = (Cc @ Bc.transpose(-1, -2)).tril()                                # (b, c, Qi, Qj)
    M = (torch.exp(spans) * CB[:, None]).view(-1, Q, Q)                    # (bhc, Qi, Qj)
    y = torch.bmm(M, X)                                                    # (bhc, Q, p)

    # What each chunk adds to the state, decayed to the chunk's end (the spans' last row).
    to_end = torch.exp(spans[..., -1, :])                                  # (b, h, c, Q)
    wB = (Bc[:, None] * to_end[..., None]).view(-1, Q, n)                  # (bhc, Q, n)
    chunk_states = torch.bmm(X.transpose(1, 2), wB).view(b, h, nc, p, n)   # (b, h, c, p, n)

    # Pass the state on: S_{c+1} = decay over chunk c · S_c + chunk c's own part. (unbind once:
    # indexing chunk c inside the loop would cost the backward a full-size zero tensor per chunk.)
    chunk_decay = torch.exp(from_start[..., -1])[..., None, None]          # (b, h, c, 1, 1)
    entering = []
    for own, decay in zip(chunk_states.unbind(2), chunk_decay.unbind(2)):
        entering.append(S)
        S = torch.addcmul(own, S, decay)                                   # (b, h, p, n)
    entering = torch.stack(entering, dim=2).view(-1, p, n)                 # (bhc, p, n)

    # The entering state's part of y: decay(i, start) C_i·S_c, the decay folded into C.
    Cw = (Cc[:, None] * torch.exp(from_start)[..., None]).view(-1, Q, n)   # (bhc, Q, n)
    y = torch.baddbmm(y, Cw, entering.transpose(1, 2))                     # (bhc, Q, p)
    y = y.view(b, h, nc, Q, p).permute(0, 2, 3, 1, 4).reshape(b, nc * Q, h, p)[:, :l]  # (b, l, h, p)
    return y, S


# -----------------------------------------------------------------------------
# Dispatch

def ssd_scan(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, chunk_size=64,
             seq_idx=None):
    """The public entry point: Triton on CUDA, the chunked PyTorch scan elsewhere.

    Returns y (b, l, h, p) in x's dtype, and with return_final_state=True also the final
    state (b, h, p, n) in fp32, ready to continue the scan or to decode from. chunk_size is
    the chunked scan's (mamba_chunk_size); the Triton kernels tile with their own _BLOCK_L.
    seq_idx (b, l), the document index of every token of a packed row, resets the state where
    it changes (the final state is then the last document's).
    """
    impl = SCAN_IMPL
    if impl == "auto":
        impl = "triton" if (x.is_cuda and triton is not None) else "chunked"
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, D, initial_state, return_final_state, seq_idx)
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, D, initial_state, return_final_state, chunk_size, seq_idx)
    if impl == "triton":
        if triton is None:
            raise RuntimeError("SCAN_IMPL='triton' was requested but Triton is not installed.")
        return ssd_triton(x, dt, A, B, C, D, initial_state, return_final_state, seq_idx)
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
#
# The same chunked algorithm as ssd_chunked, fused so that nothing of size (l, l) or
# (chunks, p, n) ever goes to memory in the forward pass. One program owns one (batch, head)
# and one block of BLOCK_P head channels; it walks the sequence chunk by chunk (BLOCK_L steps
# each) and keeps its slice of the state, (BLOCK_P, n), in registers in fp32. Programs never
# talk to each other: different heads and different channels p have independent states
# (B and C are shared, but only read).
#
# Conventions inside every kernel:
#   * every loaded value is cast to fp32 right after tl.load: the maths (exp, cumsum, the
#     state) needs fp32, and Triton's interpreter also computes bf16 arithmetic inexactly.
#     Results are cast to the output dtype only in tl.store (GPUs round to nearest there;
#     the interpreter truncates, which the tests' bf16 tolerances allow for);
#   * decays are summed directly over the steps they span (_chunk_decays), never as a
#     difference of two cumulative sums, and a document boundary (seq_idx changes) is a
#     log-decay of -inf, exactly as in ssd_chunked;
#   * positions past the end of the sequence load dt = 0 and x = B = C = dy = 0, so they
#     decay nothing and add nothing (the state passes through unchanged), and their results
#     are masked out of every store; channels past p and state columns past n load 0 too;
#   * tl.dot needs every dimension >= 16, so BLOCK_L, BLOCK_P and BLOCK_N are all >= 16 and
#     small p or n are padded with masks;
#   * DOT_PRECISION is chosen by the wrapper (see _dot_precision): "ieee" (true fp32) when the
#     inputs are fp32, "tf32" (tensor cores, ~10 mantissa bits per operand, fp32
#     accumulation) when they are 16-bit and their own rounding already dominates. The
#     interpreter always computes in fp32.
#   * each program first moves its pointers to its own (batch, head) with scalar int64
#     arithmetic (no overflow for big tensors); the offsets inside a chunk stay int32.

_BLOCK_L = 64       # chunk length of the Triton kernels; results do not depend on it
_BLOCK_P_MAX = 64   # head channels per program (p = 128 -> 2 programs per head)
_NUM_WARPS = 8      # the chunk kernels hold many 64x64 fp32 tiles: 8 warps = more registers


def _dot_precision(dtype):
    """tl.dot's input precision: fp32 inputs get true fp32 products; 16-bit inputs get tf32
    (several times faster on tensor cores; tests emulate it and see errors no larger than
    the bf16 rounding of the outputs). Accumulation is fp32 either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(p, n, block_l, block_p):
    """(BLOCK_L, BLOCK_P, BLOCK_N): powers of two, >= 16 (tl.dot's minimum); p and n are
    padded up to them with masks."""
    block_p = block_p or min(_BLOCK_P_MAX, triton.next_power_of_2(p))
    sizes = (block_l, max(16, block_p), max(16, triton.next_power_of_2(n)))
    assert all(s >= 16 and s & (s - 1) == 0 for s in sizes), \
        f"block sizes must be powers of two >= 16, got {sizes}"
    return sizes


if triton is not None:

    @triton.jit
    def _chunk_decays(dt_ptr, seq_ptr, A, t0, offs_l, mask_t, H, HAS_SEQ: tl.constexpr,
                      BLOCK_L: tl.constexpr):
        # One chunk's Δ and its log-decays, each a direct sum (see span_sums in ssd_chunked):
        #   seg[i, j]  = a_{j+1} + ... + a_i for j <= i, -inf above the diagonal
        #   from_start = a_0 + ... + a_i       to_end = a_{j+1} + ... + a_last       total = Σ a
        # with a = Δ A, and a = -inf where a new document starts (`start`).
        dt = tl.load(dt_ptr + t0 * H + offs_l * H, mask=mask_t, other=0.0).to(tl.float32)  # (BLOCK_L,)
        a = dt * A
        start = offs_l < 0                                               # all False
        if HAS_SEQ:
            pos = t0 + offs_l
            seq = tl.load(seq_ptr + pos, mask=mask_t, other=0)
            seq_prev = tl.load(seq_ptr + pos - 1, mask=mask_t & (pos > 0), other=0)
            start = mask_t & (pos > 0) & (seq != seq_prev)
            a = tl.where(start, float("-inf"), a)
        terms = tl.where(offs_l[:, None] > offs_l[None, :], a[:, None], 0.0)   # [d, j] = a_d if d > j
        seg = tl.where(offs_l[:, None] >= offs_l[None, :], tl.cumsum(terms, axis=0), float("-inf"))
        from_start = tl.cumsum(a, axis=0)
        to_end = tl.sum(tl.where(offs_l[:, None] == BLOCK_L - 1, seg, 0.0), axis=0)  # seg's last row
        total = tl.sum(a, axis=0)
        return dt, start, seg, from_start, to_end, total

    @triton.jit
    def _ssd_fwd_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, init_ptr, seq_ptr,   # inputs (contiguous)
        y_ptr, final_ptr, states_ptr,                                   # outputs
        L, H, P, N, NCHUNKS,
        HAS_D: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
        STORE_STATES: tl.constexpr,   # backward's recompute: store the state entering each
                                      # chunk in states (b, h, NCHUNKS, p, n), skip y and final
        BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)             # = batch * H + head
        pid_p = tl.program_id(1)              # which block of head channels
        bi = pid_bh // H
        hi = pid_bh % H
        offs_l = tl.arange(0, BLOCK_L)                        # (BLOCK_L,) position in chunk
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)      # (BLOCK_P,) head channel
        offs_n = tl.arange(0, BLOCK_N)                        # (BLOCK_N,) state column
        mask_p, mask_n = offs_p < P, offs_n < N
        mask_pn = mask_p[:, None] & mask_n[None, :]           # (BLOCK_P, BLOCK_N)
        # Offsets inside one chunk (int32) of x/y rows, B/C rows, and of a state slice.
        xp_tile = offs_l[:, None] * (H * P) + offs_p[None, :]   # (BLOCK_L, BLOCK_P)
        bc_tile = offs_l[:, None] * N + offs_n[None, :]         # (BLOCK_L, BLOCK_N)
        pn_tile = offs_p[:, None] * N + offs_n[None, :]         # (BLOCK_P, BLOCK_N)

        A = tl.load(A_ptr + hi).to(tl.float32)
        if HAS_D:
            Dh = tl.load(D_ptr + hi).to(tl.float32)

        # Point every tensor at this program's (batch, head): x[bi, 0, hi], dt[bi, 0, hi],
        # B[bi, 0], S[bi, hi]. Scalar int64 arithmetic, so huge tensors cannot overflow.
        x_ptr += bi.to(tl.int64) * L * H * P + hi * P
        y_ptr += bi.to(tl.int64) * L * H * P + hi * P
        dt_ptr += bi.to(tl.int64) * L * H + hi
        B_ptr += bi.to(tl.int64) * L * N
        C_ptr += bi.to(tl.int64) * L * N
        seq_ptr += bi.to(tl.int64) * L
        state0 = pid_bh.to(tl.int64) * P * N

        if HAS_INIT:
            S = tl.load(init_ptr + state0 + pn_tile, mask=mask_pn, other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)   # (BLOCK_P, BLOCK_N)

        for c in range(0, NCHUNKS):
            t0 = tl.cast(c * BLOCK_L, tl.int64)                  # first time step of the chunk
            mask_t = offs_l < L - t0                              # (BLOCK_L,) inside the sequence
            mask_tp = mask_t[:, None] & mask_p[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            x = tl.load(x_ptr + t0 * H * P + xp_tile, mask=mask_tp, other=0.0).to(tl.float32)
            Bc = tl.load(B_ptr + t0 * N + bc_tile, mask=mask_tn, other=0.0).to(tl.float32)
            # x (BLOCK_L, BLOCK_P), Bc (BLOCK_L, BLOCK_N)
            dt, start, seg, from_start, to_end, total = _chunk_decays(
                dt_ptr, seq_ptr, A, t0, offs_l, mask_t, H, HAS_SEQ, BLOCK_L)

            if STORE_STATES:
                tl.store(states_ptr + (pid_bh.to(tl.int64) * NCHUNKS + c) * P * N + pn_tile,
                         S, mask=mask_pn)
            else:
                Cc = tl.load(C_ptr + t0 * N + bc_tile, mask=mask_tn, other=0.0).to(tl.float32)
                CB = tl.dot(Cc, tl.trans(Bc), input_precision=DOT_PRECISION)    # (Li, Lj)
                scores = CB * tl.exp(seg) * dt[None, :]                          # (Li, Lj)
                y = tl.dot(scores, x, input_precision=DOT_PRECISION)            # (BLOCK_L, BLOCK_P)
                # The state entering the chunk, decayed to each position: decay(i, start) S C_i.
                y += tl.exp(from_start)[:, None] * tl.dot(Cc, tl.trans(S), input_precision=DOT_PRECISION)
                if HAS_D:
                    y += Dh * x
                tl.store(y_ptr + t0 * H * P + xp_tile, y.to(y_ptr.dtype.element_ty), mask=mask_tp)

            # S <- decay(end, start) S + Σ_j decay(end, j) Δ_j x_j B_jᵀ
            w = tl.exp(to_end) * dt                                              # (BLOCK_L,)
            S = tl.exp(total) * S + tl.dot(tl.trans(x * w[:, None]), Bc,
                                           input_precision=DOT_PRECISION)       # (BLOCK_P, BLOCK_N)

        if not STORE_STATES:
            tl.store(final_ptr + state0 + pn_tile, S, mask=mask_pn)

    @triton.jit
    def _ssd_bwd_kernel(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, states_ptr, dy_ptr, dfinal_ptr,  # inputs
        dx_ptr, dinit_ptr,                                  # outputs owned by this program
        ddt_part_ptr, dB_part_ptr, dC_part_ptr, dA_part_ptr, dD_part_ptr,  # partial sums
        L, H, P, N, NCHUNKS, NPB,
        HAS_D: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        # Walks the chunks backwards carrying dS, the gradient of the state LEAVING the chunk.
        # Per chunk, with S the state entering it (recomputed into states_ptr), in chunk-local
        # positions i (output) and j (input), and the log-decays of _chunk_decays:
        #   decay[i,j] = exp(seg[i,j])     CB = C Bᵀ     M = CB * decay * Δ_j
        #   w_j = exp(to_end_j) Δ_j        y = M X + exp(from_start) * (C Sᵀ) + D X
        #   S_out = exp(total) S + (w * X)ᵀ B
        # Gradients of y and S_out (dY, dS) flow back through these two lines only. Each decay
        # is exp of a sum of the a_k over a span of steps, so d decay / d a_k = decay for k in
        # the span.
        pid_bh = tl.program_id(0)
        pid_p = tl.program_id(1)
        bi = pid_bh // H
        hi = pid_bh % H
        offs_l = tl.arange(0, BLOCK_L)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p, mask_n = offs_p < P, offs_n < N
        mask_pn = mask_p[:, None] & mask_n[None, :]
        xp_tile = offs_l[:, None] * (H * P) + offs_p[None, :]   # (BLOCK_L, BLOCK_P) x, dy, dx
        bc_tile = offs_l[:, None] * N + offs_n[None, :]         # (BLOCK_L, BLOCK_N) B, C, dB, dC
        pn_tile = offs_p[:, None] * N + offs_n[None, :]         # (BLOCK_P, BLOCK_N) states

        A = tl.load(A_ptr + hi).to(tl.float32)
        if HAS_D:
            Dh = tl.load(D_ptr + hi).to(tl.float32)

        x_ptr += bi.to(tl.int64) * L * H * P + hi * P
        dy_ptr += bi.to(tl.int64) * L * H * P + hi * P
        dx_ptr += bi.to(tl.int64) * L * H * P + hi * P
        dt_ptr += bi.to(tl.int64) * L * H + hi
        B_ptr += bi.to(tl.int64) * L * N
        C_ptr += bi.to(tl.int64) * L * N
        seq_ptr += bi.to(tl.int64) * L
        state0 = pid_bh.to(tl.int64) * P * N
        part = pid_bh.to(tl.int64) * NPB + pid_p    # this program's slot in the partial buffers
        ddt_part_ptr += part * L                    # (b, h, NPB, l)
        dB_part_ptr += part * L * N                 # (b, h, NPB, l, n)
        dC_part_ptr += part * L * N

        if HAS_DFINAL:
            dS = tl.load(dfinal_ptr + state0 + pn_tile, mask=mask_pn, other=0.0).to(tl.float32)
        else:
            dS = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)   # (BLOCK_P, BLOCK_N)
        # Per-position accumulators (summed once at the end, so the loop-carried type is fixed):
        dA_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)   # Σ over chunks of Δ * d(log-decay)
        dD_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)   # Σ over chunks of Σ_p x * dy

        for c_rev in range(0, NCHUNKS):
            c = NCHUNKS - 1 - c_rev
            t0 = tl.cast(c * BLOCK_L, tl.int64)
            mask_t = offs_l < L - t0
            mask_tp = mask_t[:, None] & mask_p[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            # The statements are ordered so that each tile dies soon after it is made: the
            # kernel is register-bound, and the compiler mostly keeps this order.

            # Recompute the chunk's decays.
            dt, start, seg, from_start, to_end, total = _chunk_decays(
                dt_ptr, seq_ptr, A, t0, offs_l, mask_t, H, HAS_SEQ, BLOCK_L)
            exp_s = tl.exp(from_start)                                      # (BLOCK_L,)
            w = tl.exp(to_end) * dt                                         # (BLOCK_L,)

            x = tl.load(x_ptr + t0 * H * P + xp_tile, mask=mask_tp, other=0.0).to(tl.float32)
            dY = tl.load(dy_ptr + t0 * H * P + xp_tile, mask=mask_tp, other=0.0).to(tl.float32)
            Bc = tl.load(B_ptr + t0 * N + bc_tile, mask=mask_tn, other=0.0).to(tl.float32)
            Cc = tl.load(C_ptr + t0 * N + bc_tile, mask=mask_tn, other=0.0).to(tl.float32)
            # x, dY (BLOCK_L, BLOCK_P); Bc, Cc (BLOCK_L, BLOCK_N)

            # --- Through S_out's (w X)ᵀ B:  dX_j += w_j (B dSᵀ)_j,  dB_j += w_j (X dS)_j,
            # and g_j = Σ_pn dS ∘ x_j B_jᵀ = dL/dw_j (w_j carries Δ_j and exp(to_end_j)).
            XdS = tl.dot(x, dS, input_precision=DOT_PRECISION)                      # (BLOCK_L, BLOCK_N)
            g = tl.sum(XdS * Bc, axis=1)                                             # (BLOCK_L,)
            dX = w[:, None] * tl.dot(Bc, tl.trans(dS), input_precision=DOT_PRECISION)  # (BLOCK_L, BLOCK_P)
            if HAS_D:
                dX += Dh * dY
            dD_acc += tl.sum(x * dY, axis=1)

            # --- Through the intra-chunk term M X:  dX += Mᵀ dY,  dM = dY Xᵀ.
            CB = tl.dot(Cc, tl.trans(Bc), input_precision=DOT_PRECISION)            # (Li, Lj)
            decay = tl.exp(seg)                                                      # (Li, Lj)
            M = CB * decay * dt[None, :]                                             # (Li, Lj)
            dX += tl.dot(tl.trans(M), dY, input_precision=DOT_PRECISION)
            tl.store(dx_ptr + t0 * H * P + xp_tile, dX.to(dx_ptr.dtype.element_ty), mask=mask_tp)
            dM = tl.dot(dY, tl.trans(x), input_precision=DOT_PRECISION)             # (Li, Lj)

            # --- B and C through CB (M = CB * decay * Δ_j); B also through S_out.
            dCB = dM * decay * dt[None, :]                                           # (Li, Lj)
            dB = tl.dot(tl.trans(dCB), Cc, input_precision=DOT_PRECISION) + w[:, None] * XdS
            tl.store(dB_part_ptr + t0 * N + bc_tile, dB, mask=mask_tn)
            # --- Δ_j directly, as M's factor (Σ_i dM CB decay) and as w's factor.
            dMCBdecay = dM * CB * decay                                              # (Li, Lj)
            ddt = tl.sum(dMCBdecay, axis=0) + tl.exp(to_end) * g                    # (BLOCK_L,)
            # --- The gradient of each decay's log, the sum over its span of steps:
            #   R[i,j] for decay(i, j), span j < k <= i     r_j for to_end_j, span k > j
            #   q_i for from_start_i, span k <= i          z for total, every k
            R = dMCBdecay * dt[None, :]                                              # = dM ∘ M
            r = w * g

            # --- The state entering the chunk, S, and its term exp(from_start_i) S C_i in y.
            S = tl.load(states_ptr + (pid_bh.to(tl.int64) * NCHUNKS + c) * P * N + pn_tile,
                        mask=mask_pn, other=0.0)                                     # (BLOCK_P, BLOCK_N) fp32
            dC = tl.dot(dCB, Bc, input_precision=DOT_PRECISION) \
                + exp_s[:, None] * tl.dot(dY, S, input_precision=DOT_PRECISION)    # (BLOCK_L, BLOCK_N)
            tl.store(dC_part_ptr + t0 * N + bc_tile, dC, mask=mask_tn)
            CS = tl.dot(Cc, tl.trans(S), input_precision=DOT_PRECISION)             # (BLOCK_L, BLOCK_P)
            q = exp_s * tl.sum(dY * CS, axis=1)                                      # (BLOCK_L,)
            z = tl.exp(total) * tl.sum(tl.sum(dS * S, axis=1), axis=0)

            # --- da_k, a_k = Δ_k A: the sum of those gradients over every span that holds k,
            # summed directly. (Summing per position and then taking suffix sums would cancel
            # large terms, and a huge Δ_k, as at a learned reset, multiplies what is left.) Each
            # zero decay makes its terms exactly 0, so a boundary (a_k = -inf) gives no NaN; and
            # a_k = -inf there whatever Δ_k and A are, so nothing flows back to them.
            pairs_before = tl.cumsum(R, axis=1) - R                  # [i, k] = Σ_{j<k} R[i,j]
            da = tl.sum(tl.where(offs_l[:, None] >= offs_l[None, :], pairs_before, 0.0), axis=0) \
                + (tl.cumsum(r, axis=0) - r) + tl.cumsum(q, axis=0, reverse=True) + z  # (BLOCK_L,)
            da = tl.where(start, 0.0, da)
            ddt += A * da
            tl.store(ddt_part_ptr + t0 + offs_l, ddt, mask=mask_t)
            dA_acc += dt * da

            # --- dS for the previous chunk: S_out's exp(total) S and y's exp(from_start_i) S C_i.
            dS = tl.exp(total) * dS + tl.dot(tl.trans(dY * exp_s[:, None]), Cc,
                                              input_precision=DOT_PRECISION)    # (BLOCK_P, BLOCK_N)

        tl.store(dinit_ptr + state0 + pn_tile, dS, mask=mask_pn)
        tl.store(dA_part_ptr + part, tl.sum(dA_acc, axis=0))
        tl.store(dD_part_ptr + part, tl.sum(dD_acc, axis=0))

    @triton.jit
    def _ssd_step_kernel(
        state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
        H, P, N,
        HAS_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One token: S <- exp(Δ A) S + Δ x Bᵀ ; y = S C + D x.  Pure elementwise work and row
        # sums (no tl.dot), so the blocks only need to be powers of two.
        pid_bh = tl.program_id(0)             # = batch * H + head
        pid_p = tl.program_id(1)
        bi = pid_bh // H
        hi = pid_bh % H
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p, mask_n = offs_p < P, offs_n < N
        mask_pn = mask_p[:, None] & mask_n[None, :]
        state_ptr += pid_bh.to(tl.int64) * P * N          # state[bi, hi] (P, N)
        x_ptr += pid_bh.to(tl.int64) * P                  # x[bi, hi] (P,)
        y_ptr += pid_bh.to(tl.int64) * P
        pn_tile = offs_p[:, None] * N + offs_n[None, :]   # (BLOCK_P, BLOCK_N)

        S = tl.load(state_ptr + pn_tile, mask=mask_pn, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)        # (BLOCK_P,)
        dt = tl.load(dt_ptr + pid_bh).to(tl.float32)
        A = tl.load(A_ptr + hi).to(tl.float32)
        Bv = tl.load(B_ptr + bi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # (BLOCK_N,)
        Cv = tl.load(C_ptr + bi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)

        S = tl.exp(dt * A) * S + (dt * x)[:, None] * Bv[None, :]             # (BLOCK_P, BLOCK_N)
        y = tl.sum(S * Cv[None, :], axis=1)                                   # (BLOCK_P,)
        if HAS_D:
            y += tl.load(D_ptr + hi).to(tl.float32) * x
        tl.store(state_ptr + pn_tile, S, mask=mask_pn)
        tl.store(y_ptr + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def _ssd_triton_fwd(x, dt, A, B, C, D, initial_state, seq_idx, block_l, block_p, store_states=False):
    """Launch the forward kernel. Returns (y, final_state), or the per-chunk entering states
    (b, h, nchunks, p, n) fp32 when store_states (the backward's recompute)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    BLOCK_L, BLOCK_P, BLOCK_N = _blocks(p, n, block_l, block_p)
    nchunks = triton.cdiv(l, BLOCK_L)
    grid = (b * h, triton.cdiv(p, BLOCK_P))
    fp32 = dict(device=x.device, dtype=torch.float32)
    if store_states:
        states = torch.empty(b, h, nchunks, p, n, **fp32)
        y = final = states  # not written in this mode; any valid pointer will do
    else:
        states = None
        y = torch.empty_like(x)
        final = torch.empty(b, h, p, n, **fp32)
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, D if D is not None else A,
        initial_state if initial_state is not None else A,
        seq_idx if seq_idx is not None else A,
        y, final, states if states is not None else final,
        l, h, p, n, nchunks,
        HAS_D=D is not None, HAS_INIT=initial_state is not None, HAS_SEQ=seq_idx is not None,
        STORE_STATES=store_states,
        BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=_NUM_WARPS,
    )
    return states if store_states else (y, final)


def _ssd_triton_bwd(x, dt, A, B, C, D, initial_state, seq_idx, dy, dfinal, block_l, block_p):
    """Launch the state recompute and the backward kernel, then reduce the partial sums."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    BLOCK_L, BLOCK_P, BLOCK_N = _blocks(p, n, block_l, block_p)
    nchunks = triton.cdiv(l, BLOCK_L)
    npb = triton.cdiv(p, BLOCK_P)
    states = _ssd_triton_fwd(x, dt, A, B, C, D, initial_state, seq_idx, block_l, block_p, store_states=True)

    fp32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dinit = torch.empty(b, h, p, n, **fp32)
    # B, C and Δ are shared by several programs (all heads, or all channel blocks of a head):
    # each program writes its own partial sum and torch adds them up below.
    ddt_part = torch.empty(b, h, npb, l, **fp32)
    dB_part = torch.empty(b, h, npb, l, n, **fp32)
    dC_part = torch.empty(b, h, npb, l, n, **fp32)
    dA_part = torch.empty(b, h, npb, **fp32)
    dD_part = torch.empty(b, h, npb, **fp32)
    _ssd_bwd_kernel[(b * h, npb)](
        x, dt, A, B, C, D if D is not None else A, seq_idx if seq_idx is not None else A, states, dy,
        dfinal if dfinal is not None else dinit,
        dx, dinit, ddt_part, dB_part, dC_part, dA_part, dD_part,
        l, h, p, n, nchunks, npb,
        HAS_D=D is not None, HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None,
        BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=_NUM_WARPS,
    )
    ddt = ddt_part.sum(2).transpose(1, 2)       # (b, h, l) -> (b, l, h)
    dB = dB_part.sum((1, 2))                     # (b, l, n)
    dC = dC_part.sum((1, 2))
    dA = dA_part.sum((0, 2))                     # (h,)
    dD = dD_part.sum((0, 2))
    return dx, ddt, dA, dB, dC, dD, dinit


class _SSDTriton(torch.autograd.Function):
    """Forward saves only its inputs; backward recomputes the chunk states (one cheap pass)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, seq_idx, block_l, block_p):
        ctx.dtypes = (A.dtype, D.dtype if D is not None else None)
        x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        initial_state = initial_state.contiguous() if initial_state is not None else None
        seq_idx = seq_idx.to(torch.int64).contiguous() if seq_idx is not None else None
        y, final = _ssd_triton_fwd(x, dt, A, B, C, D, initial_state, seq_idx, block_l, block_p)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx)
        ctx.blocks = (block_l, block_p)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, seq_idx = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dfinal = dfinal.contiguous() if dfinal is not None else None
        dx, ddt, dA, dB, dC, dD, dinit = _ssd_triton_bwd(
            x, dt, A, B, C, D, initial_state, seq_idx, dy, dfinal, *ctx.blocks)
        A_dtype, D_dtype = ctx.dtypes
        return (dx,                                          # already in x's dtype
                ddt.to(dt.dtype),
                dA.to(A_dtype),
                dB.to(B.dtype),
                dC.to(C.dtype),
                dD.to(D_dtype) if D is not None else None,
                dinit.to(initial_state.dtype) if initial_state is not None else None,
                None, None, None)                            # seq_idx, block_l, block_p


def ssd_triton(x, dt, A, B, C, D=None, initial_state=None, return_final_state=False, seq_idx=None,
               *, block_l=_BLOCK_L, block_p=None):
    """The chunked scan as fused Triton kernels; autograd works through it (Triton backward).

    block_l / block_p are the kernels' tile sizes (powers of two, >= 16): chunk length and
    head channels per program. They change speed, never the result; tests shrink them.
    """
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    if triton is None:
        raise RuntimeError("ssd_triton needs Triton")
    y, final = _SSDTriton.apply(x, dt, A, B, C, D, initial_state, seq_idx, block_l, block_p)
    return (y, final) if return_final_state else y


def ssd_step_triton(state, x, dt, A, B, C, D=None):
    """ssd_step as one Triton kernel: advances the fp32 state (b, h, p, n) in place, returns
    y (b, h, p) in x's dtype."""
    b, h, p = x.shape
    n = B.shape[-1]
    assert state.shape == (b, h, p, n) and state.dtype == torch.float32, "state must be fp32 (b, h, p, n)"
    if triton is None:
        raise RuntimeError("ssd_step_triton needs Triton")
    work = state if state.is_contiguous() else state.contiguous()
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    y = torch.empty_like(x)
    BLOCK_P = min(_BLOCK_P_MAX, triton.next_power_of_2(p))
    BLOCK_N = triton.next_power_of_2(n)
    _ssd_step_kernel[(b * h, triton.cdiv(p, BLOCK_P))](
        work, x, dt, A, B, C, D if D is not None else A, y, h, p, n,
        HAS_D=D is not None, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
    )
    if work is not state:
        state.copy_(work)
    return y


# -----------------------------------------------------------------------------

if __name__ == "__main__":  # the benchmark moved to bench.py
    import subprocess
    import sys
    print("note: `kernels.py --bench` is now `bench.py scans`", file=sys.stderr)
    sys.exit(subprocess.call([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"),
                              "scans"] + [a for a in sys.argv[1:] if a != "--bench"]))
