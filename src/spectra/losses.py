"""Next-token loss fused with the output head, computed in chunks of rows.

The plain path materializes the logits [N, vocab] (plus their fp32 copy, the log-softmax
and its gradient, and a zero-filled one-hot gradient): for a 50k vocabulary that is the
largest tensor of a training step and several full passes of memory traffic over it.
Here the head matmul, log-sum-exp, loss and both gradients are done one block of rows at
a time, so the logits of one block (a few MB) are all that ever exists; the gradients of
the hidden states and of the head weight are produced in the forward pass and only scaled
by the incoming gradient in the backward pass (the same idea as Liger's and torchtune's
fused linear cross-entropy).

Numerics: each block's logits are computed in the autocast dtype when autocast is on
(exactly like ``lm_head`` under autocast) and reduced in fp32. The block gradient
``softmax - onehot`` is fed to the gradient matmuls *before* dividing by the token
count, so fp16 matmuls do not underflow; the 1/N (and the loss scale) are applied in
fp32 afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def head_cross_entropy(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss of ``head(h)``: the ``loss_fn`` the trainer gives ``Transformer.forward``.

    A plain ``nn.Linear`` head is fused with the cross-entropy (:func:`linear_cross_entropy`);
    a replaced head (adapter, quantized) takes the plain path: logits, then fp32 cross-entropy.
    """
    if type(head) is nn.Linear:
        return linear_cross_entropy(h, head.weight, targets, ignore_index)
    logits = head(h)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def _chunk_rows(n: int, vocab: int, dim: int, device: torch.device) -> int:
    # A block of ~2M logits (8 MB) stays in the CPU's L3 cache; ~64M (256 MB) keeps GPU
    # GEMMs large. But every block also reads and writes the fp32 head gradient [vocab, dim]
    # once: with at least 2*dim rows per block that costs less than one pass over the
    # logits the plain path would make (measured on CPU: 41-row blocks at vocab 50k made
    # the step slower than not fusing at all).
    target = (64 << 20) if device.type == "cuda" else (2 << 20)
    return max(1, min(n, max(target // max(vocab, 1), 2 * dim)))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != ignore_index
        count = int(valid.sum())
        inv = 1.0 / max(count, 1)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # Filled by the first block (beta=0 / out=); zeros only when there is no block at all.
        alloc = torch.zeros if n == 0 else torch.empty
        grad_w = alloc(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = chunk_rows or _chunk_rows(n, weight.shape[0], weight.shape[1], h.device)
        # out= ops are exempt from autocast: under autocast use the out-of-place GEMM so it runs
        # in bf16/fp16 (an fp32 GEMM would be many times slower on a GPU).
        amp = torch.is_autocast_enabled(h.device.type)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            hc, tc, vc = h[a:b], safe_t[a:b], valid[a:b]
            # One vectorized log-softmax pass (faster than logsumexp on CPU); autocast
            # applies to the matmul exactly as it does to lm_head.
            logp = torch.log_softmax((hc @ weight.t()).float(), dim=-1)
            tgt = logp.gather(1, tc[:, None]).squeeze(1)
            loss_sum -= tgt.sum() if count == n else (tgt * vc).sum()
            if not (need_h or need_w):
                continue
            # softmax - onehot, in place; ignored rows -> 0. Left unscaled by 1/count for
            # the matmuls (no fp16 underflow); the scale is applied in fp32.
            p = logp.exp_()
            p.scatter_add_(1, tc[:, None], torch.full_like(tgt[:, None], -1.0))
            if count != n:
                p.mul_(vc[:, None])
            pc = p if p.dtype == hc.dtype else p.to(hc.dtype)  # no-op in fp32 / under autocast
            if need_h:
                grad_h[a:b] = pc @ weight
            if need_w:
                if pc.dtype == torch.float32 and hc.dtype == torch.float32 and not amp:
                    # Accumulate inside the GEMM (beta), scaled by alpha: no extra passes
                    # over the [vocab, dim] gradient.
                    torch.addmm(grad_w, pc.t(), hc, beta=0.0 if a == 0 else 1.0, alpha=inv, out=grad_w)
                elif a == 0:
                    torch.mul((pc.t() @ hc).float(), inv, out=grad_w)
                else:
                    grad_w.add_((pc.t() @ hc).float(), alpha=inv)
        if grad_h is not None:
            grad_h.mul_(inv)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        # No valid target -> 0 (not NaN), so an all-padding micro-batch is harmless.
        return loss_sum * inv

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        unit = bool(g == 1)  # the usual case (no loss scale, no accumulation): skip a pass
        gh = gw = None
        if grad_h is not None:
            gh = grad_h if unit else grad_h * g.to(grad_h.dtype)
        if grad_w is not None:
            gw = (grad_w if unit else grad_w * g).to(ctx.w_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (ignoring ``ignore_index``).

    ``h``: [..., dim] hidden states; ``weight``: [vocab, dim] head; ``targets``: [...] ids.
    Equal to ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), targets.flatten())``
    up to fp32 summation order, without materializing the logits. ``chunk_rows`` = 0 picks
    a block size for the device.
    """
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h2.shape[0]:
        raise ValueError(f"targets hold {t.shape[0]} positions but the hidden states {h2.shape[0]}")
    if not (torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad)):
        with torch.no_grad():
            return _LinearCrossEntropy.forward(_NoGradCtx(), h2, weight, t, ignore_index, chunk_rows)
    return _LinearCrossEntropy.apply(h2, weight, t, ignore_index, chunk_rows)


class _NoGradCtx:
    """Stand-in ctx for evaluation: no gradients wanted, nothing saved."""

    needs_input_grad = (False, False, False, False, False)

    def save_for_backward(self, *a):
        pass
