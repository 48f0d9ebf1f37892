# ruff: noqa: N803 -- the arguments keep the paper's symbols A, B, C, D (house style rule 7).
"""How the Mamba backbone scans its tokens: the orders over the patch grid, and the selective scan
of Mamba's S6 layer (a reference loop, a fast pure-PyTorch version, and the ``mamba_ssm`` CUDA
kernel when it is installed).

Scan orders are computed from token positions, so they apply to any subset of the grid (see the
routing rule in :mod:`tread.models.mamba`). The three scans take ``mamba_ssm``'s layout and
compute, per batch row b, channel e and state n (Gu & Dao 2023, Algorithm 2; zero-order hold for
A, Euler step for B, as the kernel does)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_{-1} = 0
    y_t = sum_n C_t[n] * h_t[n] + D * u_t

with ``u``, ``delta``: (B, E, L); ``A``: (E, N); ``B``, ``C``: (B, N, L) (input-dependent, the
"selective" part); ``D``: (E,). The arithmetic runs in float32 (float64 stays float64) and the
output has ``u``'s dtype, like the kernel.

Why not the log-space parallel scan (h_t = P_t * cumsum(dBx_s / P_s), P_t the cumulative product
of exp(delta * A))? 1 / P_s = exp(sum(delta) * |A|) overflows float32 once a chunk's
sum(delta) * |A| passes ~88 (16 steps at delta = 0.35 with the largest S4D-real |A| = 16), and a
trained delta is unbounded. :func:`selective_scan_chunked` instead vectorises everything except
the recurrence itself (discretisation, outputs, all gradient reductions) over chunks of time steps
and runs the recurrence as one fused multiply-add per step, forward and (hand-derived) backward.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# --- Scan orders over the patch grid -----------------------------------------------------------

ScanName = Literal["bidirectional", "zigzag"]
SCANS: tuple[str, ...] = get_args(ScanName)
ZIGZAG_PATTERNS = 8  # 4 corners x (row snake, column snake)


def grid_positions(grid: int, *, device: torch.device | None = None) -> Tensor:
    """(row, col) of every token in raster order: (grid*grid, 2) long."""
    index = torch.arange(grid * grid, device=device)
    return torch.stack([index // grid, index % grid], dim=1)  # (N,) -> (N, 2)


def raster_keys(pos: Tensor, grid: int) -> Tensor:
    """Row-major rank of each position: (B, K, 2) -> (B, K)."""
    return pos[..., 0] * grid + pos[..., 1]


def zigzag_keys(pos: Tensor, grid: int, pattern: int) -> Tensor:
    """Rank of each position along ZigMa-style snake ``pattern`` (0..7) of the full grid.

    Pattern p starts in a corner (bit 1: from the right, bit 2: from the bottom) and walks a
    row snake (p even: along a row, then back along the next) or a column snake (p odd); every
    step moves to a grid neighbour. Pattern 0 on a 3x3 grid: 0 1 2 / 5 4 3 / 6 7 8.

    Args:
        pos: (B, K, 2) long (row, col).
        grid: tokens per side.
        pattern: 0..7.

    Returns:
        (B, K) long ranks in [0, grid*grid).
    """
    if not 0 <= pattern < ZIGZAG_PATTERNS:
        raise ValueError(f"zigzag pattern must be in [0, {ZIGZAG_PATTERNS}), got {pattern}")
    row, col = pos[..., 0], pos[..., 1]
    if pattern & 2:
        col = grid - 1 - col
    if pattern & 4:
        row = grid - 1 - row
    major, minor = (row, col) if pattern % 2 == 0 else (col, row)
    minor = torch.where(major % 2 == 0, minor, grid - 1 - minor)  # odd lines run backwards
    return major * grid + minor


def scan_orders(pos: Tensor, grid: int, scan: str, block_index: int) -> tuple[Tensor, ...]:
    """The order in which each of a block's scans visits its input tokens.

    Args:
        pos: (B, K, 2) long positions of the block's input tokens (any K-subset of the grid).
        grid: tokens per side of the full grid.
        scan: ``"bidirectional"`` or ``"zigzag"``.
        block_index: the block's depth index (selects the zigzag pattern).

    Returns:
        One (B, K) long permutation of the input tokens per direction: scan step k reads input
        token ``order[:, k]``.
    """
    if scan == "bidirectional":
        forward = raster_keys(pos, grid).argsort(dim=1)  # (B, K)
        return forward, forward.flip(1)
    if scan == "zigzag":
        return (zigzag_keys(pos, grid, block_index % ZIGZAG_PATTERNS).argsort(dim=1),)
    raise ValueError(f"unknown scan {scan!r}; choose one of {SCANS}")


# --- The selective scan -----------------------------------------------------------------------

# Time steps per vectorised chunk. Chunk tensors are (chunk, B, N, E): small chunks stay in the
# CPU cache; 2 was the fastest of 1/2/4/8 for the digits model (B 64, E 256, N 16, L 64).
DEFAULT_CHUNK = 2


def _work_dtype(u: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (tests)."""
    return torch.promote_types(u.dtype, torch.float32)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> Tensor:
    """The recurrence written as a plain loop over time (the definition; slow, autograd only).

    Args:
        u: (B, E, L) input sequence per channel.
        delta: (B, E, L) positive step sizes (softplus already applied).
        A: (E, N) state matrix diagonal (negative for a stable scan).
        B: (B, N, L) input projection per step.
        C: (B, N, L) output projection per step.
        D: (E,) skip weight, or None.

    Returns:
        (B, E, L) outputs, dtype of ``u``.
    """
    work = _work_dtype(u)
    u_, delta_, A_, B_, C_ = (v.to(work) for v in (u, delta, A, B, C))
    batch, channels, length = u.shape
    h = u_.new_zeros(batch, channels, A.shape[1])  # (B, E, N)
    outputs = []
    for t in range(length):
        decay = torch.exp(delta_[:, :, t, None] * A_)  # (B, E, 1) * (E, N) -> (B, E, N)
        drive = (delta_[:, :, t] * u_[:, :, t])[:, :, None] * B_[:, None, :, t]  # (B, E, N)
        h = decay * h + drive
        outputs.append((h * C_[:, None, :, t]).sum(-1))  # (B, E, N) -> (B, E)
    y = torch.stack(outputs, dim=-1)  # L x (B, E) -> (B, E, L)
    if D is not None:
        y = y + D.to(work)[:, None] * u_
    return y.to(u.dtype)


class _ChunkedScan(torch.autograd.Function):
    """Selective scan with a hand-written backward, time-major: states are (T, B, N, E) chunks.

    Allocation matters on CPU: a fresh buffer of tens of MB is mapped from the OS and its first
    write costs a page fault per 4 KiB. So the decays and states kept for backward are one
    tensor per chunk (heap-sized), and every temporary goes into a per-call scratch buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        chunk: int,
    ) -> Tensor:
        work = _work_dtype(u)
        u_t = u.to(work).permute(2, 0, 1).contiguous()  # (B, E, L) -> (L, B, E)
        delta_t = delta.to(work).permute(2, 0, 1).contiguous()  # (B, E, L) -> (L, B, E)
        B_t = B.to(work).permute(2, 0, 1).contiguous()  # (B, N, L) -> (L, B, N)
        C_t = C.to(work).permute(2, 0, 1).contiguous()  # (B, N, L) -> (L, B, N)
        A_t = A.to(work).t().contiguous()  # (E, N) -> (N, E)
        # exp(s) = 2^(s log2 e): torch's exp2 is ~4x faster than its exp on CPU (AVX-512).
        A_log2 = A_t * math.log2(math.e)
        D_ = D.to(work)
        x_t = delta_t * u_t  # (L, B, E): delta * u, the input of every state
        length, batch, channels = u_t.shape

        decays: list[Tensor] = []  # exp(delta * A) per chunk, (T, B, N, E)
        states: list[Tensor] = []  # h per chunk, (T, B, N, E), kept for backward
        y = u_t.new_empty(length, batch, channels)
        scratch = u_t.new_empty(min(chunk, length), batch, A_t.shape[0], channels)
        previous: Tensor | None = None  # h_{t-1}, (B, N, E)
        for start in range(0, length, chunk):
            steps = slice(start, min(start + chunk, length))
            # (T, B, 1, E) * (N, E) -> (T, B, N, E)
            decay = torch.mul(delta_t[steps, :, None, :], A_log2).exp2_()
            # h starts as the drive delta * B * u: (T, B, 1, E) * (T, B, N, 1) -> (T, B, N, E)
            h = torch.mul(x_t[steps, :, None, :], B_t[steps, :, :, None])
            for t in range(h.shape[0]):
                if previous is not None:
                    h[t].addcmul_(decay[t], previous)  # h_t = drive_t + decay_t * h_{t-1}
                previous = h[t]
            # y_t = sum_n C_t[n] h_t[n, :]: (T, B, N, E) -> (T, B, E)
            product = torch.mul(h, C_t[steps, :, :, None], out=scratch[: h.shape[0]])
            torch.sum(product, dim=2, out=y[steps])
            decays.append(decay)
            states.append(h)
        y.addcmul_(D_, u_t)  # the skip
        ctx.save_for_backward(u_t, delta_t, x_t, A_t, B_t, C_t, D_)
        ctx.decays, ctx.states, ctx.chunk = decays, states, chunk  # intermediates, not inputs
        ctx.dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype, C.dtype, D.dtype)
        return y.permute(1, 2, 0).to(u.dtype)  # (L, B, E) -> (B, E, L)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        u_t, delta_t, x_t, A_t, B_t, C_t, D_ = ctx.saved_tensors
        decays, states, chunk = ctx.decays, ctx.states, ctx.chunk
        length, batch, channels = u_t.shape
        num_states = A_t.shape[0]
        gy = grad_y.to(u_t.dtype).permute(2, 0, 1).contiguous()  # (B, E, L) -> (L, B, E)

        grad_x = torch.empty_like(u_t)  # through x = delta * u
        grad_delta_decay = torch.empty_like(u_t)  # through decay = exp(delta * A)
        grad_B = torch.empty_like(B_t)
        grad_C = torch.empty_like(C_t)
        grad_A_rows = u_t.new_zeros(batch, num_states, channels)  # summed over the batch below
        # Scratch: grad h for two chunks (this one and the later one, whose first step feeds
        # this chunk's last), the decay-path gradient g, and products before a sum.
        size = (min(chunk, length), batch, num_states, channels)
        grad_h_buffers = [u_t.new_empty(size), u_t.new_empty(size)]
        g_buffer, scratch = u_t.new_empty(size), u_t.new_empty(size)
        later: tuple[Tensor, Tensor] | None = None  # (decay_{t+1}, grad h_{t+1}) after a chunk
        starts = range(0, length, chunk)
        for index in reversed(range(len(starts))):
            start = starts[index]
            steps = slice(start, min(start + chunk, length))
            T = steps.stop - start
            decay, h = decays[index], states[index]
            # grad h_t = C_t * gy_t + decay_{t+1} * grad h_{t+1}; the direct part first:
            # (T, B, 1, E) * (T, B, N, 1) -> (T, B, N, E)
            grad_h = grad_h_buffers[index % 2][:T]
            torch.mul(gy[steps, :, None, :], C_t[steps, :, :, None], out=grad_h)
            for t in reversed(range(T)):
                if later is not None:
                    grad_h[t].addcmul_(*later)
                later = (decay[t], grad_h[t])
            # grad C_t[n] = sum_e gy_t[e] h_t[n, e]: (T, B, N, E) -> (T, B, N)
            product = torch.mul(h, gy[steps, :, None, :], out=scratch[:T])
            torch.sum(product, dim=-1, out=grad_C[steps])
            # grad x_t[e] = sum_n B_t[n] grad h_t[n, e]: (T*B, 1, N) @ (T*B, N, E) -> (T*B, 1, E)
            torch.bmm(
                B_t[steps].reshape(T * batch, 1, num_states),
                grad_h.view(T * batch, num_states, channels),
                out=grad_x[steps].view(T * batch, 1, channels),
            )
            # grad B_t[n] = sum_e x_t[e] grad h_t[n, e]: (T, B, N, E) -> (T, B, N)
            product = torch.mul(grad_h, x_t[steps, :, None, :], out=scratch[:T])
            torch.sum(product, dim=-1, out=grad_B[steps])
            # Through the decay: g = grad h_t * decay_t * h_{t-1} is dLoss/d(delta_t * A) per
            # (n, e); h_{-1} = 0.
            g = torch.mul(grad_h, decay, out=g_buffer[:T])
            g[1:].mul_(h[:-1])
            if index > 0:
                g[0].mul_(states[index - 1][-1])
            else:
                g[0].zero_()
            for t in range(T):
                grad_A_rows.addcmul_(g[t], delta_t[start + t, :, None, :])  # (B, N, E)
            torch.sum(g.mul_(A_t), dim=2, out=grad_delta_decay[steps])  # -> (T, B, E)

        grad_u = grad_x * delta_t
        grad_u.addcmul_(D_, gy)  # skip path
        grad_delta = grad_x.mul_(u_t).add_(grad_delta_decay)
        grad_D = (gy * u_t).sum(dim=(0, 1))  # (L, B, E) -> (E,)
        grad_A = grad_A_rows.sum(dim=0).t()  # (B, N, E) -> (E, N)
        u_dtype, delta_dtype, A_dtype, B_dtype, C_dtype, D_dtype = ctx.dtypes
        return (
            grad_u.permute(1, 2, 0).to(u_dtype),  # (L, B, E) -> (B, E, L)
            grad_delta.permute(1, 2, 0).to(delta_dtype),  # (L, B, E) -> (B, E, L)
            grad_A.to(A_dtype),
            grad_B.permute(1, 2, 0).to(B_dtype),  # (L, B, N) -> (B, N, L)
            grad_C.permute(1, 2, 0).to(C_dtype),  # (L, B, N) -> (B, N, L)
            grad_D.to(D_dtype),
            None,
        )


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """The same scan, vectorised over chunks of ``chunk_size`` time steps (about 4x faster on CPU).

    Discretisation (exp(delta * A), delta * B * u), the outputs C . h and every gradient
    reduction run as whole-chunk tensor ops; only the recurrence h_t = decay_t * h_{t-1} + drive_t
    (and its adjoint, backward) steps through time, one fused multiply-add per step. The forward
    pass uses element-wise ops and sums only (no matmul), so a FLOP counter sees none of it.
    Memory: the decays and states are kept for backward, 2 x (L, B, N, E) floats.

    Args:
        u, delta, A, B, C, D: as for :func:`selective_scan_reference`.
        chunk_size: time steps per vectorised chunk (any value gives the same result).

    Returns:
        (B, E, L) outputs, dtype of ``u``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if D is None:
        D = u.new_zeros(u.shape[1], dtype=_work_dtype(u))
    return _ChunkedScan.apply(u, delta, A, B, C, D, chunk_size)


@functools.cache
def mamba_ssm_scan() -> Callable[..., Tensor] | None:
    """``mamba_ssm``'s fused CUDA selective scan, or None when the package is not installed.

    Imported on first use, never at module import, so tread works without the ``[ssm]`` extra;
    the answer is cached, so the fallback is logged once.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        log.info(
            "mamba_ssm is not installed: CUDA models use the pure-PyTorch selective scan "
            "(pip install 'tread[ssm]' for the fused kernel)"
        )
        return None
    return selective_scan_fn


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
) -> Tensor:
    """The scan the model uses: the ``mamba_ssm`` kernel on CUDA when installed
    (``pip install tread[ssm]``), else :func:`selective_scan_chunked`.

    Args:
        u, delta, A, B, C, D: as for :func:`selective_scan_reference`.

    Returns:
        (B, E, L) outputs, dtype of ``u``.
    """
    if u.is_cuda:
        kernel = mamba_ssm_scan()
        if kernel is not None:
            # The kernel reads u, delta, B, C in one dtype and A, D in float32.
            return kernel(
                u.contiguous(),
                delta.to(u.dtype).contiguous(),
                A.float(),
                B.to(u.dtype).contiguous(),
                C.to(u.dtype).contiguous(),
                None if D is None else D.float(),
            )
    return selective_scan_chunked(u, delta, A, B, C, D)
