"""Small random Hugging Face Llama directories for the eval tests and benchmarks.

Built with transformers itself (``LlamaForCausalLM.save_pretrained`` plus a
``PreTrainedTokenizerFast`` around a ``tokenizer.json``), so the directory is what a
user would download from the hub, and lm-eval's ``hf`` model loads it unchanged.
"""

from __future__ import annotations

from pathlib import Path


def make_random_llama(out: str | Path, tokenizer_json: str | Path, *, hidden: int = 64, layers: int = 2,
                      heads: int = 4, ffn: int = 128, max_len: int = 512, seed: int = 0, std: float = 0.2,
                      vocab: int | None = None) -> Path:
    """Save a random LlamaForCausalLM (+ tokenizer) to ``out``; returns ``out``.

    ``std`` is larger than a trained model's init so that choices are not all
    near-ties (ties would make accuracy comparisons between backends meaningless).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from spectra.config import padded_vocab

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.model_max_length = max_len
    v = vocab or padded_vocab(len(tok))
    cfg = LlamaConfig(vocab_size=v, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    out = Path(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
