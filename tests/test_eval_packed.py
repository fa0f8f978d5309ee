"""Packed checkpoints through the `spectra` lm-eval model: TriLM (native engine) and QuantLM (GPTQ layout)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra; scripts/setup.sh installs it)")
pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")

from spectra.checkpoint import save_model  # noqa: E402
from spectra.config import ModelConfig  # noqa: E402
from spectra.model import Transformer  # noqa: E402
from spectra.ternary import to_ternary  # noqa: E402
from conftest import Req  # noqa: E402

CFG = ModelConfig(dim=256, n_layers=2, n_heads=4, ffn_dim=512, vocab_size=50304, max_seq_len=256)


REQS = [Req("The cat sat on the", " mat"), Req("The cat sat on the", " dog and more"),
        Req("Hello", " world, how are you"), Req("", "Nothing before this")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    from conftest import shared_data

    return shared_data("tokenizer", "gpt-neox-20b.json")


def test_packed_trilm_native_matches_unpacked(tmp_path, neox):
    import spectra.infer as infer
    from spectra.eval.lm import SpectraLM

    m = to_ternary(Transformer(CFG).init_weights(0), 1)
    save_model(m, tmp_path / "tri", "trilm", tokenizer=neox, meta={"step": 7, "tokens": 1234})
    infer.write_packed(tmp_path / "tri", tmp_path / "tri-packed")
    dense = SpectraLM(pretrained=str(tmp_path / "tri"))
    packed = SpectraLM(pretrained=str(tmp_path / "tri-packed"))
    assert packed.loaded.kind.startswith("packed-trilm") and packed.loaded.family == "trilm"
    assert packed.loaded.step == 7
    a = dense.loglikelihood(REQS, disable_tqdm=True)
    b = packed.loglikelihood(REQS, disable_tqdm=True)
    for (la, ga), (lb, gb) in zip(a, b):
        # the native kernel quantizes activations entering ternary matrices (int8 + residual)
        assert abs(la - lb) <= 1e-3 * max(1.0, abs(la))
    g = [Req("Once upon a time", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    assert dense.generate_until(g, disable_tqdm=True) == packed.generate_until(g, disable_tqdm=True)
    ref = SpectraLM(pretrained=str(tmp_path / "tri-packed"), packed_backend="torch")
    assert ref.loaded.kind == "packed-trilm-torch"
    c = ref.loglikelihood(REQS, disable_tqdm=True)
    # the reference holds exactly what the file stores (f16 embedding/head): close to fp32, closer to native
    assert all(abs(x[0] - y[0]) <= 1e-3 * max(1.0, abs(x[0])) for x, y in zip(a, c))
    assert all(abs(x[0] - y[0]) <= 1e-3 * max(1.0, abs(x[0])) for x, y in zip(b, c))


def test_packed_quantlm_matches_unpacked(tmp_path, neox):
    import spectra.quant as quant
    from spectra.eval.lm import SpectraLM

    m = Transformer(CFG).init_weights(1)
    qm, qstate, report = quant.quantize_model(m, None, bits=4, group_size=128, method="rtn")
    spec = quant.QuantSpec(bits=4, group_size=128, method="rtn")
    paths = quant.save_quantized(qm, qstate, tmp_path / "q4", spec, tokenizer=neox)
    packed_dir = paths.get("packed") if isinstance(paths, dict) else tmp_path / "q4-packed"
    dense = SpectraLM(pretrained=str(tmp_path / "q4"))
    packed = SpectraLM(pretrained=str(packed_dir))
    assert packed.loaded.kind == "packed-quantlm"
    a = dense.loglikelihood(REQS, disable_tqdm=True)
    b = packed.loglikelihood(REQS, disable_tqdm=True)
    assert all(abs(x[0] - y[0]) < 1e-3 and x[1] == y[1] for x, y in zip(a, b))
