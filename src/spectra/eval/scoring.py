"""Batched log-likelihood scoring with shared-prefix reuse ("tree" batching).

lm-eval's ``hf`` model scores each (context, continuation) pair as its own
right-padded row and computes a full-vocabulary log-softmax at every position.
Multiple-choice tasks repeat the same context for every choice, and only the
continuation positions are scored, so we do two things differently while computing
the same numbers:

* requests whose model input shares the same unscored prefix are packed into one
  row: ``prefix | branch_1 | branch_2 | ...``; each branch attends to the prefix and
  to itself (a tree attention mask) and its RoPE positions continue from the end of
  the prefix, exactly as if it were its own sequence;
* the output head and log-softmax run only at the scored positions.

The token split is lm-eval's: ``inp = (ctx + cont)[-(max_length + 1):][:-1]`` and
the last ``len(cont)`` positions of ``inp`` predict ``cont``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Branch:
    req: int  # index into the caller's request list
    suffix: list[int]  # scored input tokens (fed to the model)
    targets: list[int]  # the continuation tokens they predict


@dataclass
class _Row:
    prefix: tuple[int, ...]
    branches: list[_Branch]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(b.suffix) for b in self.branches)


def is_tree_capable(model) -> bool:
    """True for our Transformer (also with replaced linears): ``hidden(tok, positions=, mask=)`` and ``lm_head``."""
    from spectra.model import Transformer

    return isinstance(model, Transformer)


def plan_rows(requests: list[tuple[list[int], list[int]]], max_length: int, share_prefix: bool = True) -> list[_Row]:
    """Group requests by their unscored input prefix; split groups into rows of <= max_length tokens."""
    groups: dict[tuple[int, ...], list[_Branch]] = {}
    order: list[tuple[int, ...]] = []
    rows: list[_Row] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must be non-empty token lists")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        full = (list(ctx) + list(cont))[-(max_length + 1):]
        inp = full[:-1]
        split = len(inp) - len(cont)
        prefix, br = tuple(inp[:split]), _Branch(i, inp[split:], list(cont))
        if not share_prefix:
            rows.append(_Row(prefix, [br]))
            continue
        if prefix not in groups:
            groups[prefix] = []
            order.append(prefix)
        groups[prefix].append(br)
    for prefix in order:
        cur = _Row(prefix, [])
        for br in groups[prefix]:
            if cur.branches and cur.length + len(br.suffix) > max_length:
                rows.append(cur)
                cur = _Row(prefix, [])
            cur.branches.append(br)
        rows.append(cur)
    # Longest first (as lm-eval): padding is bounded by the batch's first row and any
    # memory problem shows up at once.
    rows.sort(key=lambda r: -r.length)
    return rows


def batches(rows: list[_Row], batch_size: int, max_batch_tokens: int):
    i = 0
    while i < len(rows):
        L = rows[i].length
        n = max(1, min(batch_size, max_batch_tokens // max(L, 1)))
        yield rows[i : i + n]
        i += n


def _tree_inputs(rows: list[_Row], device):
    """tokens/positions [B, L], bool attention mask [B, 1, L, L], scored index lists."""
    B, L = len(rows), max(r.length for r in rows)
    tok = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    branch = torch.full((B, L), -1, dtype=torch.long)  # -1 padding, 0 prefix, k>0 branch k
    scored_rows, scored_cols, targets, owners = [], [], [], []
    plain = True  # every row a single causal sequence without padding -> is_causal fast path
    for b, r in enumerate(rows):
        lp = len(r.prefix)
        if lp:
            tok[b, :lp] = torch.tensor(r.prefix)
            pos[b, :lp] = torch.arange(lp)
            branch[b, :lp] = 0
        c = lp
        for k, br in enumerate(r.branches, start=1):
            n = len(br.suffix)
            tok[b, c : c + n] = torch.tensor(br.suffix)
            pos[b, c : c + n] = torch.arange(lp, lp + n)
            branch[b, c : c + n] = k
            scored_rows.extend([b] * n)
            scored_cols.extend(range(c, c + n))
            targets.extend(br.targets)
            owners.append((br.req, n))
            c += n
        plain &= len(r.branches) == 1 and c == L
    mask = None
    if not plain:
        idx = torch.arange(L)
        causal = idx[None, :] <= idx[:, None]  # [L(query), L(key)]
        bq, bk = branch[:, :, None], branch[:, None, :]
        same = (bk == 0) | (bk == bq)
        mask = causal[None] & (same | torch.eye(L, dtype=torch.bool)[None])
        mask = mask[:, None]
    return (tok.to(device), pos.to(device), None if mask is None else mask.to(device),
            torch.tensor(scored_rows), torch.tensor(scored_cols), torch.tensor(targets), owners)


def _plain_inputs(rows: list[_Row], device):
    """Right-padded single-sequence rows for models that only expose ``model(idx) -> logits``."""
    B, L = len(rows), max(r.length for r in rows)
    tok = torch.zeros(B, L, dtype=torch.long)
    scored_rows, scored_cols, targets, owners = [], [], [], []
    for b, r in enumerate(rows):
        (br,) = r.branches
        seq = list(r.prefix) + br.suffix
        tok[b, : len(seq)] = torch.tensor(seq)
        n, c = len(br.suffix), len(r.prefix)
        scored_rows.extend([b] * n)
        scored_cols.extend(range(c, c + n))
        targets.extend(br.targets)
        owners.append((br.req, n))
    return tok.to(device), torch.tensor(scored_rows), torch.tensor(scored_cols), torch.tensor(targets), owners


def is_native(model) -> bool:
    """A spectra.infer NativeEngine (packed TriLM on the C kernel): one sequence with a KV cache."""
    return getattr(model, "backend", None) == "native" and all(
        hasattr(model, a) for a in ("forward", "reset", "set_pos"))


def _score_native(eng, requests, max_length: int, pbar=None) -> list[tuple[float, bool]]:
    """Shared-prefix reuse on a single-sequence engine: prefill the prefix once, then
    rewind the KV cache to its end before each branch."""
    out: list = [None] * len(requests)
    for r in plan_rows(requests, max_length):
        eng.reset()
        lp = len(r.prefix)
        if lp:
            eng.forward(list(r.prefix))
        for br in r.branches:
            eng.set_pos(lp)  # rewind the KV cache to the end of the shared prefix
            logits = torch.from_numpy(eng.forward(br.suffix, all_logits=True))
            logp = F.log_softmax(logits.float(), dim=-1)
            tgt = torch.tensor(br.targets)
            out[br.req] = (float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all()))
        if pbar is not None:
            pbar.update(len(r.branches))
    return out


@torch.no_grad()
def score(model, requests: list[tuple[list[int], list[int]]], *, max_length: int, batch_size: int = 32,
          max_batch_tokens: int = 8192, device="cpu", pbar=None) -> list[tuple[float, bool]]:
    """(sum log p(cont | ctx), is_greedy) per request, in request order."""
    if is_native(model):
        return _score_native(model, requests, max_length, pbar)
    tree = is_tree_capable(model)
    rows = plan_rows(requests, max_length, share_prefix=tree)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for chunk in batches(rows, batch_size, max_batch_tokens):
        if tree:
            tok, pos, mask, r_idx, c_idx, tgt, owners = _tree_inputs(chunk, device)
            h = model.hidden(tok, positions=pos, mask=mask)[r_idx, c_idx]  # [N, dim] scored positions only
            logits = model.lm_head(h)
        else:
            tok, r_idx, c_idx, tgt, owners = _plain_inputs(chunk, device)
            logits = model(tok)[r_idx, c_idx]
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = tgt.to(logp.device)
        tok_lp = logp.gather(1, tgt[:, None])[:, 0]
        greedy = logp.argmax(-1) == tgt
        start = 0
        for req, n in owners:
            out[req] = (float(tok_lp[start : start + n].sum()), bool(greedy[start : start + n].all()))
            start += n
        if pbar is not None:
            pbar.update(len(owners))
    return out  # type: ignore[return-value]
