"""spectra.store: one place decides what a path is, loads it, names outputs and finds tokenizers."""

import json
import sys
import types
import warnings

import pytest
import torch

from spectra.config import ModelConfig
from spectra.errors import SpectraError
from spectra.model import Transformer
from spectra.store import (
    DTYPE_NAMES, Kind, build_model, detect, find_tokenizer, kind_of, load, load_model, load_tokenizer,
    parse_quantlm_name, quantlm_name, read_model_config, resolve, save_model, torch_dtype,
)

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=384, max_seq_len=64)


def _tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    tok = _tokenizer(d / "tok.json")
    save_model(Transformer(CFG).init_weights(0), d / "float", "floatlm", tokenizer=tok, meta={"step": 3})
    return d / "float"


def test_kind_of_every_kind(model_dir, tmp_path):
    assert kind_of(model_dir) is Kind.SPECTRA
    hf = tmp_path / "hf"
    hf.mkdir()
    d = json.loads((model_dir / "config.json").read_text())
    d.pop("spectra")
    (hf / "config.json").write_text(json.dumps(d))
    assert kind_of(hf) is Kind.HF
    q = tmp_path / "q"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({**d, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert kind_of(q) is Kind.QUANTLM
    (q / "config.json").write_text(json.dumps(d))
    (q / "quantize_config.json").write_text("{}")
    assert kind_of(q) is Kind.QUANTLM
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "packed.json").write_text("{}")
    assert kind_of(pk) is Kind.PACKED_TRILM
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert kind_of(tmp_path / "m.gguf") is Kind.GGUF
    gd = tmp_path / "gd"
    gd.mkdir()
    (gd / "x.gguf").write_bytes(b"GGUF")
    assert kind_of(gd) is Kind.GGUF
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert kind_of(run) is Kind.RUN and str(Kind.RUN) == "run"
    (tmp_path / "empty").mkdir()
    assert detect(tmp_path / "empty") is None and detect(tmp_path / "nope") is None
    with pytest.raises(SpectraError, match="is not a model directory: no config.json"):
        kind_of(tmp_path / "empty")
    with pytest.raises(SpectraError, match="does not exist"):
        kind_of(tmp_path / "nope")


def test_load_targets(model_dir, tmp_path):
    cfg = load(model_dir, "config")
    assert cfg == read_model_config(model_dir)[0] and cfg.dim == CFG.dim
    assert load(model_dir, "meta")["spectra"]["step"] == 3
    m = load(model_dir, "model")
    ref, _ = load_model(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert load(model_dir, "model", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert load(model_dir, "tokenizer").token_to_id("b") == 2
    assert load(tmp_path, "tokenizer", required=False) is None
    with pytest.raises(SpectraError, match="unknown load target 'weights'; allowed: config"):
        load(model_dir, "weights")
    with pytest.raises(SpectraError, match="not a packed model directory"):
        load(model_dir, "packed")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(SpectraError, match="GGUF file for llama.cpp"):
        load(tmp_path / "m.gguf", "model")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(SpectraError, match=r"training run directory, not a model: pass .*final"):
        load(tmp_path / "run", "config")


def test_build_model_keeps_rope_fp32_and_matches_load(model_dir):
    from spectra.store import read_weights

    for dt in (torch.float32, torch.float16):
        m = build_model(CFG, read_weights(model_dir), dtype=dt)
        assert m.lm_head.weight.dtype == dt and m.rope_cos.dtype == torch.float32 and not m.training
        ref = Transformer(CFG)
        assert torch.equal(m.rope_cos, ref.rope_cos) and torch.equal(m.rope_sin, ref.rope_sin)
    with pytest.raises(SpectraError, match="src: missing tensor 'embed_tokens.weight'"):
        build_model(CFG, {}, source="src")


def test_resolve_paths_and_hub_ids(model_dir, tmp_path, monkeypatch):
    assert resolve(model_dir) == model_dir
    assert resolve(tmp_path / "missing") == tmp_path / "missing"  # callers say "does not exist"
    calls = []

    def fake(s, revision=None):
        calls.append((s, revision))
        return model_dir

    hub = types.ModuleType("spectra.store.hub")
    hub.hub_id = lambda s: s if s.count("/") == 1 and not s.startswith(("/", ".")) else None
    hub.resolve_model = fake
    monkeypatch.setitem(sys.modules, "spectra.store.hub", hub)
    assert resolve("owner/name", "v1") == model_dir and calls == [("owner/name", "v1")]
    assert load("owner/name", "config").dim == CFG.dim
    with pytest.raises(SpectraError, match="--revision applies to Hub ids"):
        resolve(str(tmp_path / "a" / "b"), "main")


def test_output_names_round_trip():
    cases = [((4, 128, "gptq", 0), "q4-g128-s0"), ((8, -1, "gptq", 2), "q8-grow-s2"), ((3, 64, "rtn", None), "q3-g64-rtn")]
    for args, name in cases:
        assert quantlm_name(*args) == name
        q = parse_quantlm_name(name)
        assert (q.bits, q.group_size, q.method, q.seed) == args and str(q) == name and not q.packed
        assert parse_quantlm_name(name + "-packed").packed
    q = parse_quantlm_name("q6-g128-s11")
    assert q.family == "q6" and q.variant == "s11"
    for bad in ("q4-g128", "floatlm-tiny1", "q4-g128-s0-extra", "q-g128-s0"):
        with pytest.raises(SpectraError, match="is not a QuantLM output name"):
            parse_quantlm_name(bad)
    with pytest.raises(SpectraError, match="needs its calibration seed"):
        quantlm_name(4, 128, "gptq", None)


def test_dtype_names():
    assert [torch_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.float16, torch.bfloat16]
    assert torch_dtype(None) is torch.float32 and torch_dtype(torch.float16) is torch.float16
    with pytest.raises(SpectraError, match="dtype 'float8' is not supported; allowed: float32, float16, bfloat16"):
        torch_dtype("float8")


def test_tokenizer_lookup(model_dir, tmp_path):
    assert find_tokenizer(model_dir) == model_dir / "tokenizer.json"
    assert find_tokenizer(model_dir / "tokenizer.json") == model_dir / "tokenizer.json"
    assert find_tokenizer(tmp_path) is None and load_tokenizer(tmp_path, required=False) is None
    with pytest.raises(SpectraError, match="tokenizer file not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SpectraError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    pytest.importorskip("transformers", reason="transformers not installed (the hf extra)")
    hf = load_tokenizer(model_dir, hf=True)  # the directory's tokenizer_config.json: AutoTokenizer
    assert hf("a b")["input_ids"] == [1, 2]
    (tmp_path / "bare").mkdir()
    with pytest.raises(SpectraError, match="has no tokenizer"):
        load_tokenizer(tmp_path / "bare", hf=True)
    assert load_tokenizer(tmp_path / "bare", required=False, hf=True) is None


def test_run_layout(model_dir, tmp_path):
    import shutil

    from spectra.store import checkpoints, final_model, read_metrics, read_suite_index, write_suite_index

    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)  # incomplete: no train_state/state.json
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # torn last line
    assert checkpoints(run) == [] and final_model(run) is None
    assert read_metrics(run) == [{"step": 1, "loss": 2.0}]
    shutil.copytree(model_dir, run / "final")
    assert final_model(run) == run / "final"
    write_suite_index(tmp_path, {"preset": "tiny"}, [{"id": "floatlm-tiny1"}])
    assert read_suite_index(tmp_path) == [{"id": "floatlm-tiny1"}]
    (tmp_path / "models.json").write_text('{"models": 3}')
    with pytest.raises(SpectraError, match="'models' must be a list"):
        read_suite_index(tmp_path)


def test_engine_backends_table(model_dir, tmp_path, monkeypatch):
    from spectra.infer import backends
    from spectra.infer.engine import TorchEngine

    assert backends.CHOICES == ("auto", "native", "torch")
    eng = backends.open_engine(model_dir)  # a dense directory: torch, whatever 'auto' prefers
    assert isinstance(eng, TorchEngine) and eng.forward([1, 2]).shape == (CFG.vocab_size,)
    with pytest.raises(SpectraError, match="not a packed model; the native backend needs 'spectra pack' output"):
        backends.open_engine(model_dir, "native")
    with pytest.raises(SpectraError, match="unknown backend 'cuda'; allowed: auto, native, torch"):
        backends.open_engine(model_dir, "cuda")

    from spectra.infer.packed_model import write_packed
    from spectra.ternary import to_ternary

    save_model(to_ternary(Transformer(CFG).init_weights(1), 1), tmp_path / "tri", "trilm")
    write_packed(tmp_path / "tri", tmp_path / "packed", progress=False)

    def unavailable(*a, **k):
        raise backends.BackendUnavailable("no C compiler here")

    native = backends.BACKENDS["native"]
    monkeypatch.setitem(backends.BACKENDS, "native", backends.Backend(native.name, native.help, True, unavailable,
                                                                       unavailable))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng = backends.open_engine(tmp_path / "packed")
    assert isinstance(eng, TorchEngine) and any("native backend unavailable" in str(x.message) for x in w)
    with pytest.raises(SpectraError, match="no C compiler here"):
        backends.open_engine(tmp_path / "packed", "native")
    dense = load(tmp_path / "tri", "model")
    ref = load(tmp_path / "packed", "model")  # the packed file's exact reference: gamma*W_hat as stored
    for name, p in dense.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.equal(p, dict(ref.named_parameters())[name])
