"""The lm-evaluation-harness model ``spectra``: FloatLM, TriLM, QuantLM and any HF Llama dir.

Registered with lm-eval's registry when ``spectra.eval`` is imported, so both
``lm_eval.simple_evaluate(model="spectra", model_args={"pretrained": DIR})`` and
``python -m spectra.harness --model spectra --model_args pretrained=DIR ...`` work.

Semantics mirror lm-eval's own ``hf`` model (``lm_eval/models/huggingface.py``):
the same tokenizer (loaded with transformers from the model directory), the same
context/continuation split (``TemplateLM._encode_pair``), the same left truncation
and dropped last token, the same rolling windows for perplexity and the same stop
handling for generation. Only the execution differs (see :mod:`spectra.eval.scoring`).

model_args: ``pretrained`` (dir), ``tokenizer`` (dir or tokenizer.json),
``batch_size`` (rows per forward), ``max_batch_tokens``, ``max_length``, ``dtype``
(float32 default on CPU), ``device``, ``add_bos_token``, ``prefix_token_id``,
``max_gen_toks``, ``threads``, ``seed`` (sampling only), ``packed_backend`` (auto | native |
torch: how a packed TriLM directory is run; native = spectra.infer's C engine).
"""

from __future__ import annotations

import logging
import time

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from spectra.eval import scoring
from spectra.eval.loading import describe, load_for_eval

eval_logger = logging.getLogger(__name__)


def _special_kwargs(add_special_tokens: bool | None, add_bos: bool | None) -> dict:
    # As lm-eval's hf model decides add_special_tokens (its helper is private to lm-eval).
    if add_special_tokens is not None:
        return {"add_special_tokens": add_special_tokens}
    if add_bos is not None:
        return {"add_special_tokens": add_bos}
    return {}


def _req_bar(total: int, desc: str, disable: bool):
    # unit "req": tqdm then shows requests/s, the figure users compare backends by.
    return tqdm(total=total, desc=desc, unit="req", disable=disable, smoothing=0.1)


@register_model("spectra")
class SpectraLM(TemplateLM):
    backend = "causal"

    def __init__(self, pretrained=None, tokenizer=None, batch_size: int | str | None = 32,
                 max_batch_tokens: int = 8192, max_length: int | None = None, dtype: str = "float32",
                 device: str | None = "cpu", add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 max_gen_toks: int = 256, threads: int | None = None, seed: int = 1234,
                 max_batch_size: int | None = None, packed_backend: str = "auto", **kwargs) -> None:
        super().__init__()
        if threads:
            torch.set_num_threads(int(threads))
        dev = "cpu" if device in (None, "", "auto") else str(device)
        if dev.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults to --device cuda; on a CPU machine that means "the CPU".
            eval_logger.warning("device %s requested but CUDA is not available; using cpu", dev)
            dev = "cpu"
        self.loaded = load_for_eval(pretrained, tokenizer=tokenizer, dtype=dtype, device=dev,
                                    packed_backend=packed_backend, threads=int(threads) if threads else None)
        self._model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self._device = torch.device(dev)
        # lm-eval passes batch_size as int, numeric str or "auto"; "auto" -> our default
        # (rows are additionally capped by max_batch_tokens, so memory stays bounded).
        bs = str(batch_size if batch_size is not None else 32)
        self.batch_size = int(bs.split(":")[0]) if bs.split(":")[0].isdigit() else 32
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = int(max_length) if max_length else self.loaded.max_length
        self.add_bos_token = add_bos_token if add_bos_token is None else str(add_bos_token).lower() in ("1", "true", "yes")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self._max_gen_toks = int(max_gen_toks)
        self._gen = torch.Generator().manual_seed(int(seed))
        self.stats = {"loglikelihood_requests": 0, "loglikelihood_seconds": 0.0}

    # --- properties lm-eval uses -------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.loaded.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.loaded.bos_token_id is not None:
            return int(self.loaded.bos_token_id)
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"spectra": describe(self.loaded)}

    # --- tokenization (as HFLM.tok_encode) ------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            enc = enc[-left_truncate_len:]
        return enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, desc: str = "loglikelihood"):
        t0 = time.perf_counter()
        pbar = _req_bar(len(requests), desc, disable_tqdm or self.rank != 0)
        res = scoring.score(self._model, [(list(c), list(t)) for _, c, t in requests], max_length=self.max_length,
                           batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens, device=self._device,
                           pbar=pbar)
        pbar.close()
        for (req_str, _, _), ans in zip(requests, res):
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, ans)
        self.stats["loglikelihood_requests"] += len(requests)
        self.stats["loglikelihood_seconds"] += time.perf_counter() - t0
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            ws = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, c, t) for c, t in ws)
            counts.append(len(ws))
        nlls = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm, desc="loglikelihood_rolling")
        out, i = [], 0
        for req, n in zip(requests, counts):
            total = sum(ll for ll, _ in nlls[i : i + n])
            i += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def _greedy(self, ctx: list[int], max_new: int, stop: list[str], do_sample: bool, temperature: float) -> list[int]:
        """Decode with a KV cache until a stop string appears in the text, EOS, or max_new tokens."""
        from spectra.model import KVCache

        m = self._model
        if scoring.is_native(m):  # packed TriLM: the C engine keeps its own KV cache
            m.reset()
            step = lambda toks: torch.from_numpy(m.forward(toks)).float()  # noqa: E731
        elif scoring.is_tree_capable(m):
            cache = KVCache.empty(m.cfg, 1, len(ctx) + max_new, dtype=m.embed_tokens.weight.dtype, device=self._device)
            step = lambda toks: m(torch.tensor([toks], device=self._device), cache)[0, -1].float()  # noqa: E731
        else:  # a bare callable model: recompute the whole sequence each step
            seq = list(ctx)

            def step(toks):
                if toks is not ctx:
                    seq.extend(toks)
                return m(torch.tensor([seq], device=self._device))[0, -1].float()
        out: list[int] = []
        logits = step(ctx)
        for _ in range(max_new):
            if do_sample and temperature > 0:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=self._gen))
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == self.eot_token_id or len(out) == max_new:
                break
            if stop:
                # Stop strings are matched on the decoded text (they may span tokens); only
                # the tail can newly contain one.
                tail = self.tok_decode(out[-8:], skip_special_tokens=False)
                if any(s and s in tail for s in stop):
                    break
            logits = step([nxt])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res = []
        pbar = _req_bar(len(requests), "generate_until", disable_tqdm or self.rank != 0)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            max_ctx = self.max_length - max_new
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_new} must be less than max_length={self.max_length}")
            ctx = self.tok_encode(context, left_truncate_len=max_ctx)
            toks = self._greedy(ctx, max_new, until, bool(kw.get("do_sample")), float(kw.get("temperature") or 0.0))
            s = postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None)
            res.append(s)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
            pbar.update(1)
        pbar.close()
        return res
