"""Bidirectional WKV (Vision-RWKV's Bi-WKV) in pure PyTorch: a reference and a fast equivalent.

For one channel of a sequence of T tokens with keys ``k``, values ``v``, the channel's decay
``w`` and bonus ``u`` (Vision-RWKV, Duan et al. 2024, Bi-WKV equation):

    wkv_t = sum_i a_ti v_i / sum_i a_ti,   a_ti = exp(k_i - (|t - i| - 1) w / T)   for i != t,
                                           a_tt = exp(u + k_t).

Every token sees every other token, the weight decaying with the distance |t - i| measured in
units of the sequence length T (so ``w`` is the total decay across the sequence, whatever T
is), and the token itself gets the bonus ``u`` instead of a decay. A positive ``w`` favours
near tokens; a negative one (Vision-RWKV's initialisation spans [-5, 3]) favours far ones.
Vision-RWKV's code divides ``u`` by T as well; we keep the equation's ``u`` (unscaled), so the
bonus does not vanish on long sequences and does not change with the routed token count.

Written as logits, ``wkv_t`` is a softmax-weighted mean of the values:

    wkv_t = sum_i softmax_i(k_i + P(t, i)) v_i,
    P(t, i) = -(|t - i| - 1) w / T  for i != t,   P(t, t) = u,

which is what :func:`bi_wkv_reference` computes (the softmax subtracts the row maximum, so it is
stable for any inputs). :func:`bi_wkv` factors the logits into a per-channel Toeplitz matrix
exp(P) and a per-token exp(k) and does the sums as batched matrix products: the same numbers
(to float rounding), much less memory and time. Both compute in float32 with autocast off and
return the dtype of ``v``.

No CUDA kernel is wired in: flash-linear-attention's RWKV-4 kernel (``fused_recurrent_rwkv4``)
is causal and returns only the normalised ratio, so the forward and backward halves of Bi-WKV
cannot be added exactly from two of its calls (the sums need each half's numerator and
denominator, not their ratios). Vision-RWKV's own CUDA kernel is not a package.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_logits(w: Tensor, u: Tensor, num_tokens: int) -> Tensor:
    """The distance term P(t, i) of the Bi-WKV logits, per channel.

    Args:
        w: (C,) decay per channel (total decay across the sequence).
        u: (C,) bonus per channel for the token itself.
        num_tokens: T, the length of the sequence the WKV runs over.

    Returns:
        (C, T, T) float32: ``-(|t - i| - 1) * w / T`` off the diagonal, ``u`` on it.
    """
    w, u = w.float(), u.float()
    T = num_tokens
    position = torch.arange(T, device=w.device, dtype=torch.float32)
    distance = (position[:, None] - position[None, :]).abs()  # (T, 1) - (1, T) -> (T, T)
    decay = -(distance - 1) * (w / T)[:, None, None]  # (T, T) * (C, 1, 1) -> (C, T, T)
    diagonal = torch.eye(T, dtype=torch.bool, device=w.device)  # (T, T)
    return torch.where(diagonal, u[:, None, None], decay)  # (C, T, T)


def _check(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> None:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (B, T, C), got {tuple(k.shape)}, {tuple(v.shape)}")
    channels = k.shape[2]
    if w.shape != (channels,) or u.shape != (channels,):
        raise ValueError(
            f"w and u must be ({channels},) for k of shape {tuple(k.shape)}, got "
            f"{tuple(w.shape)}, {tuple(u.shape)}"
        )


def bi_wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bi-WKV as the explicit O(T^2 C) softmax over all token pairs (the definition).

    Args:
        w: (C,) decay per channel.
        u: (C,) bonus per channel.
        k: (B, T, C) keys.
        v: (B, T, C) values.

    Returns:
        (B, T, C) in the dtype of ``v``: ``wkv_t`` for every token t (module docstring).
    """
    _check(w, u, k, v)
    with torch.autocast(device_type=k.device.type, enabled=False):
        T = k.shape[1]
        # Logits of token t for input i: (B, 1, T_i, C) + (T_t, T_i, C) -> (B, T_t, T_i, C).
        logits = k.float().unsqueeze(1) + position_logits(w, u, T).permute(1, 2, 0)
        weights = logits.softmax(dim=2)  # normalised over the inputs i (max-subtracted)
        out = (weights * v.float().unsqueeze(1)).sum(dim=2)  # (B, T, T, C) -> (B, T, C)
    return out.to(v.dtype)


def bi_wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Bi-WKV as batched matrix products with a per-channel Toeplitz decay matrix.

    ``a_ti = exp(P(t, i)) * exp(k_i)``, so numerator and denominator are both a (T, T) matrix
    per channel times a length-T vector per sample: one ``bmm`` (channels as its batch) over
    the exp-weighted values and the weights, stacked along the batch. For stability both
    factors are shifted by their maxima, exp(P - max P) per channel and exp(k - max_t k) per
    sample and channel, so every factor lies in (0, 1] and nothing overflows; the shifts cancel
    in the ratio (they are detached: the result does not depend on them). The denominator
    then holds at least exp(min P - max P) (the term of the largest key), so in float32 the
    result equals :func:`bi_wkv_reference` while the spread of P, about ``|w| + |u|``, stays
    below ~80 (the initialisation spans less than 10).

    Cost per sample: 4 T^2 C FLOPs in the ``bmm`` (numerator and denominator) plus O(T^2 C)
    element-wise work on the decay matrix, shared by the batch (and not counted by
    ``torch.utils.flop_counter``).

    Args:
        w: (C,) decay per channel.
        u: (C,) bonus per channel.
        k: (B, T, C) keys.
        v: (B, T, C) values.

    Returns:
        (B, T, C) in the dtype of ``v``.
    """
    _check(w, u, k, v)
    with torch.autocast(device_type=k.device.type, enabled=False):
        B = k.shape[0]
        logits = position_logits(w, u, k.shape[1])  # (C, T, T)
        decay = (logits - logits.amax(dim=(1, 2), keepdim=True).detach()).exp()  # (C, T, T)
        k = k.float()
        weight = (k - k.amax(dim=1, keepdim=True).detach()).exp()  # (B, T, C) in (0, 1]
        stacked = torch.cat([weight * v.float(), weight], dim=0)  # (2B, T, C)
        # Channels as the bmm batch, contiguous, so the CPU bmm needs no per-channel copies.
        stacked = stacked.permute(2, 1, 0).contiguous()  # (2B, T, C) -> (C, T, 2B)
        sums = torch.bmm(decay, stacked)  # (C, T, T) @ (C, T, 2B) -> (C, T, 2B)
        out = sums[:, :, :B] / sums[:, :, B:]  # numerator / denominator: (C, T, B)
    return out.permute(2, 1, 0).to(v.dtype)  # (C, T, B) -> (B, T, C)
