"""Issue 15, findings 2, 4, 7, 8: hostile input files and absurd flags give one line and exit 2.

Each test reproduces a finding of the hostile-user review (a crash, an out-of-bounds read in C,
a machine-sized allocation, a traceback or a silent default) and checks the one-line refusal.
Crashes that could take the test process down run in a subprocess with a memory cap.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from spectra.cli import main
from spectra.config import get_preset
from spectra.errors import SpectraError
from spectra.infer.packed_model import PackedModel, read_packed_meta, write_packed
from spectra.model import Transformer
from spectra.store import save_model
from spectra.ternary import to_ternary
from spectra import validate as V

pytestmark = pytest.mark.usefixtures("one_thread")
MEM_CAP = 6 << 30  # address-space cap of the CLI subprocesses: an unchecked huge allocation fails, not the machine


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """A random nano TriLM checkpoint (fp32) and its t2/f16 packed directory."""
    d = tmp_path_factory.mktemp("nano")
    ck = save_model(to_ternary(Transformer(get_preset("nano").model).init_weights(5), 1), d / "ck", "trilm")
    write_packed(ck, d / "pk", "t2", "f16", progress=False)
    return {"ck": ck, "pk": d / "pk", "dir": d}


def cli(*args, timeout: int = 180, cwd=None) -> subprocess.CompletedProcess:
    """`python -m spectra ARGS` in a subprocess with an address-space cap (a crash cannot take pytest along)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "spectra", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap, env=env, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr (no traceback), mentioning ``needles``."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def in_process(capsys, *args) -> str:
    """cli.main in this process: must return 2 with a one-line message (any exception fails the test)."""
    rc = main([str(a) for a in args])
    # (train prints a 'note:' about bf16 on some CPUs after checking its config, before the memory check)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith(("[", "note:"))]
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def edited_packed(src, dst, fn):
    shutil.copytree(src, dst)
    m = json.loads((dst / "packed.json").read_text())
    fn(m)
    (dst / "packed.json").write_text(json.dumps(m))
    return dst


def _set(path, value):
    def f(m):
        *head, last = path.split("/")
        cur = m
        for k in head:
            cur = cur[k]
        cur[last] = value
    return f


DOWN = "linear/layers.0.mlp.down_proj"
PACKED_EDITS = {
    "vocab raised": _set("model/vocab_size", 99999),
    "dim raised": _set("model/dim", 256),
    "ffn raised": _set("model/ffn_dim", 768),
    "heads not dividing": _set("model/n_heads", 3),
    "layers raised": _set("model/n_layers", 5),
    "dim huge": _set("model/dim", 10**9),
    "max_seq_len huge": _set("model/max_seq_len", 10**12),
    "k raised": _set(f"{DOWN}/k", 100000),
    "rows raised": _set(f"{DOWN}/rows", 100000),
    "kp changed": _set(f"{DOWN}/kp", 1024),
    "mp changed": _set(f"{DOWN}/mp", 2),
    "split flipped": _set(f"{DOWN}/split", "col"),
    "fmt mismatch": _set(f"{DOWN}/fmt", "t1"),
    "row_bytes wrong": _set(f"{DOWN}/row_bytes", 1 << 20),
    "k not int": _set(f"{DOWN}/k", "384"),
    "tensor shape": _set("tensors/embed_tokens.weight/shape", [8192, 128]),
    "file outside": _set("file/name", "../ck/model.safetensors"),
    "bytes not int": _set("file/bytes", "x"),
    "eos huge": _set("eos_token_id", 10**20),
    "head unknown": _set("head", "q4"),
    "weights unknown": _set("weights", "t3"),
    "model list": _set("model", [1, 2]),
    "linear list": _set("linear", []),
    "norm_eps nan": _set("model/norm_eps", float("nan")),
}


@pytest.mark.parametrize("edit", sorted(PACKED_EDITS))
def test_packed_json_fields_checked_against_tensors(nano, tmp_path, edit):
    """Finding 2: every packed.json field (model.*, linear.*) is checked before it reaches C."""
    d = edited_packed(nano["pk"], tmp_path / "p", PACKED_EDITS[edit])
    with pytest.raises(SpectraError, match="packed.json"):
        PackedModel.load(d, verify=False)


def test_packed_json_not_an_object_or_not_utf8(nano, tmp_path):
    for name, data in {"list": b"[1, 2]", "latin1": b'{"format": "\xe9"}', "empty": b"", "keys": b"{}"}.items():
        d = tmp_path / name
        shutil.copytree(nano["pk"], d)
        (d / "packed.json").write_bytes(data)
        with pytest.raises(SpectraError, match="packed.json"):
            read_packed_meta(d)


def test_raised_vocab_segfaulted_now_exit_2(nano, tmp_path):
    """Finding 2 reproducer: vocab_size raised (checksums still valid) + an id past the embedding: was SIGSEGV."""
    d = edited_packed(nano["pk"], tmp_path / "v", _set("model/vocab_size", 99999))
    one_line_error(cli("generate", d, "--prompt-ids", "1,90000", "--max-new-tokens", "2"), "packed.json")


def test_raised_k_read_past_tensors_now_exit_2(nano, tmp_path):
    """Finding 2 reproducer: linear k/rows raised: was SIGSEGV/SIGBUS or rc 0 reading past the tensors."""
    def f(m):
        m["linear"]["layers.0.mlp.down_proj"].update(k=10**7, kp=10000128, rows=10**5)
    d = edited_packed(nano["pk"], tmp_path / "k", f)
    one_line_error(cli("generate", d, "--prompt-ids", "1,2", "--max-new-tokens", "2"), "down_proj")


@pytest.mark.parametrize("tok", ["4096", "-1", "100000000000000000000"])
@pytest.mark.parametrize("which", ["ck", "pk"])
def test_token_ids_range_checked(nano, capsys, which, tok):
    """Finding 2: ids outside [0, vocab) on the torch backend (a checkpoint) and the native one (packed)."""
    msg = in_process(capsys, "generate", nano[which], "--prompt-ids", f"1,{tok}", "--max-new-tokens", "1")
    assert "vocabulary" in msg and "4096" in msg


def test_token_range_check_function():
    assert V.check_token_ids(np.array([0, 5, 9]), 10) == [0, 5, 9]
    for bad in ([10], [-1], [10**20], [1.5], ["3"], [True]):
        with pytest.raises(SpectraError):
            V.check_token_ids(bad, 10)


# ----------------------------------------------------------------------------- pack checks config.json
def _ck_with(nano, dst, cfg_edit=None, sd_edit=None):
    shutil.copytree(nano["ck"], dst)
    if cfg_edit:
        c = json.loads((dst / "config.json").read_text())
        cfg_edit(c)
        (dst / "config.json").write_text(json.dumps(c))
    if sd_edit:
        from safetensors.torch import load_file, save_file

        sd = load_file(str(dst / "model.safetensors"))
        sd_edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_pack_checks_config_against_tensor_shapes(nano, tmp_path):
    """Finding 2: pack accepted vocab_size > embedding rows (the packed model then segfaulted), a huge
    hidden size, and a transposed down_proj."""
    cases = {
        "vocab": (lambda c: c.update(vocab_size=8192), None, "embed_tokens"),
        "hidden": (lambda c: c.update(hidden_size=10**9), None, "limit"),
        "transposed": (None, lambda sd: sd.update({"model.layers.1.mlp.down_proj.weight":
                                                   sd["model.layers.1.mlp.down_proj.weight"].T.contiguous()}),
                       "down_proj"),
    }
    for name, (ce, se, needle) in cases.items():
        ck = _ck_with(nano, tmp_path / name, ce, se)
        with pytest.raises(SpectraError, match=needle):
            write_packed(ck, tmp_path / f"out-{name}", progress=False)
        assert not (tmp_path / f"out-{name}").exists()


# ----------------------------------------------------------------------------- finding 4: limits
def test_generate_max_len_checked_before_rope_tables(nano):
    """Finding 4: --max-len 1e8 built ~45 GB of RoPE tables before any check (OOM killer)."""
    t = time.perf_counter()
    one_line_error(cli("generate", nano["pk"], "--prompt-ids", "1,2", "--max-len", "100000000"), "--max-len", "256")
    one_line_error(cli("generate", nano["ck"], "--prompt-ids", "1,2", "--max-len", "100000000"), "--max-len")
    assert time.perf_counter() - t < 120


@pytest.mark.parametrize("flag", [["--seed", "-1"], ["--max-new-tokens", "-5"], ["--top-p", "nan"]])
def test_generate_sampling_flags(nano, capsys, flag):
    """--seed -1 was a numpy traceback."""
    assert flag[0].lstrip("-").split("-")[0] in in_process(capsys, "generate", nano["pk"], "--prompt-ids", "1,2",
                                                           "--temperature", "1", *flag)


@pytest.mark.parametrize("n", ["100000", "-4", "0"])
def test_generate_threads_bounded(nano, capsys, n):
    """Finding 4: --threads 100000 started tens of thousands of threads; -4 was accepted."""
    assert "--threads" in in_process(capsys, "generate", nano["pk"], "--prompt-ids", "1,2", "--threads", n)


def test_huge_config_sizes_refused_before_allocating(nano, tmp_path):
    """Finding 4/8: config.json with hidden_size 1e9 or max_position_embeddings 1e12: exit 2 quickly, no OOM."""
    for name, edit in {"dim": {"hidden_size": 10**9}, "ctx": {"max_position_embeddings": 10**12},
                       "vocab": {"vocab_size": 10**12}}.items():
        ck = _ck_with(nano, tmp_path / name, lambda c, e=edit: c.update(e))
        one_line_error(cli("generate", ck, "--prompt-ids", "1,2", "--backend", "torch"), "limit")


def test_memory_check_refuses_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(V, "available_memory", lambda: 1 << 30)
    V.check_memory(1 << 20, "x")
    with pytest.raises(SpectraError, match="needs 2.0 GiB but only 1.0 GiB"):
        V.check_memory(2 << 30, "the KV cache", "lower --max-len")


def test_allocation_failure_is_one_line(monkeypatch, capsys):
    """Finding 7: an allocation failure (MemoryError) is a one-line error with exit 2, not a traceback."""
    import spectra.commands.info as info

    def boom(args):
        raise MemoryError()
    monkeypatch.setattr(info, "run", boom)
    assert "out of memory" in in_process(capsys, "info")


# ----------------------------------------------------------------------------- finding 7: corrupt files
def _corrupt_safetensors(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header-2^64-1":
        path.write_bytes((2**64 - 1).to_bytes(8, "little") + data[8:])
    elif how == "past-end":
        n = int.from_bytes(data[:8], "little")
        h = json.loads(data[8:8 + n])
        name = next(k for k in h if k != "__metadata__")
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + len(data), e + len(data)]
        raw = json.dumps(h).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


HOW = ["truncated", "header-2^64-1", "past-end"]


@pytest.mark.parametrize("how", HOW)
def test_corrupt_safetensors_one_line_in_every_loader(nano, tmp_path, capsys, how):
    """Finding 7: corrupt safetensors in every command: one line, exit 2."""
    ck = _ck_with(nano, tmp_path / "ck", None, None)
    _corrupt_safetensors(ck / "model.safetensors", how)
    msg = in_process(capsys, "generate", ck, "--prompt-ids", "1,2", "--backend", "torch")
    assert "model.safetensors" in msg
    assert "model.safetensors" in in_process(capsys, "pack", ck, "--out", tmp_path / "p")
    assert "model.safetensors" in in_process(capsys, "export", ck, "--to", "hf", "--out", tmp_path / "e")
    pk = tmp_path / "pk"
    shutil.copytree(nano["pk"], pk)
    _corrupt_safetensors(pk / "model.safetensors", how)
    with pytest.raises(SpectraError, match="model.safetensors"):
        PackedModel.load(pk)


def test_safetensors_header_checks():
    with pytest.raises(SpectraError, match="truncated"):
        V.safetensors_header(_write(b"abc"))
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    V.safetensors_header(_write(len(hdr).to_bytes(8, "little") + hdr + bytes(8)))
    for bad in ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
                {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
                {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
                {"a": [1]}, [1], {"__metadata__": {"a": 1}}):
        h = json.dumps(bad).encode()
        with pytest.raises(SpectraError):
            V.safetensors_header(_write(len(h).to_bytes(8, "little") + h + bytes(8)))


_N = iter(range(10**6))


def _write(data: bytes):
    import tempfile

    p = os.path.join(tempfile.gettempdir(), f"spectra-st-{os.getpid()}-{next(_N)}.safetensors")
    with open(p, "wb") as f:
        f.write(data)
    return p


@pytest.mark.parametrize("content", [b"\xff\xfe{not utf8", b"[1, 2, 3]", b'{"model_type": "llama"}'])
def test_bad_config_json_one_line(nano, tmp_path, capsys, content):
    """Finding 7: config.json that is not UTF-8, is a JSON list, or lacks keys."""
    ck = _ck_with(nano, tmp_path / "ck")
    (ck / "config.json").write_bytes(content)
    assert "config.json" in in_process(capsys, "generate", ck, "--prompt-ids", "1,2")
    assert "config.json" in in_process(capsys, "pack", ck, "--out", tmp_path / "p")


@pytest.mark.parametrize("content", [b"\xff\xfe{", b"[1, 2]", b'{"format": "spectra-packed-ternary"}', b"[" * 100000])
def test_bad_packed_json_one_line(nano, tmp_path, capsys, content):
    pk = tmp_path / "pk"
    shutil.copytree(nano["pk"], pk)
    (pk / "packed.json").write_bytes(content)
    assert "packed.json" in in_process(capsys, "generate", pk, "--prompt-ids", "1,2")


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[1, 2]", b"{\"optim\": [1]}", b"optim: {lr: .nan}"])
def test_bad_train_config_one_line(tmp_path, capsys, content):
    """Finding 7: --config not UTF-8, a JSON/YAML list, a wrong type, nan."""
    f = tmp_path / ("c.yaml" if content.startswith(b"optim:") else "c.json")
    f.write_bytes(content)
    assert "c." in in_process(capsys, "train", "--config", f, "--steps", "1", "--preset", "nano")


def test_junk_tokenizer_with_prompt_ids(nano, tmp_path, capsys):
    """Finding 7: a junk tokenizer.json was a traceback even with --prompt-ids."""
    pk = tmp_path / "pk"
    shutil.copytree(nano["pk"], pk)
    (pk / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    assert "tokenizer" in in_process(capsys, "generate", pk, "--prompt-ids", "1,2", "--max-new-tokens", "1")


def test_out_not_writable_checked_before_the_work(nano, tmp_path, capsys):
    """Finding 7: a non-writable --out (pack, eval) failed only after all the work; eval --out a directory."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "sub" / "out", "/sys/spectra-test-out/x"):
        t = time.perf_counter()
        assert "--out" in in_process(capsys, "pack", nano["ck"], "--out", out)
        assert "--out" in in_process(capsys, "eval", nano["ck"], "--ppl", blocker, "--out", f"{out}.json")
        assert time.perf_counter() - t < 30
    (tmp_path / "dir").mkdir()
    assert "is a directory" in in_process(capsys, "eval", nano["ck"], "--ppl", blocker, "--out", tmp_path / "dir")


@pytest.mark.parametrize("value", ["-1", "nan", ".inf", "0"])
def test_optim_lr_invalid(capsys, tmp_path, value):
    """Finding 7: optim.lr=-1 or nan was a traceback deep in training."""
    msg = in_process(capsys, "train", "--preset", "nano", "--steps", "1", "--out", tmp_path / "r",
                     "--data", tmp_path, f"optim.lr={value}")
    assert "optim.lr" in msg


def test_val_data_object_array_refused(nano, tmp_path):
    """Finding 7: an object array in --val-data (needs pickle) is refused, never unpickled."""
    from spectra.eval.perplexity import validation_loss
    from spectra.store import load

    d = tmp_path / "val"
    d.mkdir()
    np.save(d / "a.npy", np.array([{"x": 1}, 2], dtype=object), allow_pickle=True)
    model = load(nano["ck"], "model")
    with pytest.raises(SpectraError, match="a.npy"):
        validation_loss(model, d, seq_len=8, progress=False)
    np.save(d / "a.npy", np.arange(100, dtype=np.float32))
    with pytest.raises(SpectraError, match="integer"):
        validation_loss(model, d, seq_len=8, progress=False)
    np.save(d / "a.npy", -np.arange(100, dtype=np.int64))
    with pytest.raises(SpectraError, match="vocabulary"):
        validation_loss(model, d, seq_len=8, progress=False)
    np.save(d / "a.npy", np.arange(1000, dtype=np.int64))
    for bad in (0, 257):  # the nano context is 256
        with pytest.raises(SpectraError, match="val-seq-len"):
            validation_loss(model, d, seq_len=bad, progress=False)


# ----------------------------------------------------------------------------- finding 8: silent defaults
@pytest.mark.parametrize("flags", [["--tasks", ""], ["--tasks", " , "], ["--batch-size", "0"], ["--ppl-seq-len", "0"],
                                   ["--ppl-stride", "0"], ["--ppl-max-tokens", "0"], ["--threads", "0"],
                                   ["--limit", "nan"]])
def test_eval_zero_is_not_default(nano, tmp_path, capsys, flags):
    """Finding 8: --tasks '' evaluated nothing with rc 0; --batch-size/--ppl-seq-len/--ppl-stride 0 meant 'default'."""
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 20)
    msg = in_process(capsys, "eval", nano["ck"], "--ppl", f, *flags)
    assert flags[0] in msg


def test_perplexity_zero_refused_in_the_api(nano, tmp_path):
    from spectra.eval.perplexity import perplexity

    f = tmp_path / "t.txt"
    f.write_text("x")
    for kw in ({"seq_len": 0}, {"stride": 0}, {"max_tokens": 0}):
        with pytest.raises(SpectraError, match=next(iter(kw))):
            perplexity(nano["ck"], [f], progress=False, **kw)


def test_weights_written_with_normal_permissions(nano):
    """Finding 8: model.safetensors came out 0600 (safetensors creates its files private)."""
    um = os.umask(0)
    os.umask(um)
    for d in (nano["ck"], nano["pk"]):
        for f in d.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~um, f


def test_dotted_overrides_after_a_flag(capsys):
    """Finding 8: `train optim.lr=1e-3 --steps 3 schedule.warmup=0` failed to parse."""
    assert main(["train", "--print-config", "optim.lr=1e-3", "--steps", "3", "schedule.warmup=0",
                 "--preset", "nano", "optim.beta1=0.8"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["schedule"]["warmup"] == 0 and cfg["optim"]["beta1"] == 0.8
    with pytest.raises(SystemExit):
        main(["train", "--print-config", "--steps", "3", "--bogus", "1"])


def test_train_config_ranges():
    from spectra.train.config import TrainConfig, validate

    base = TrainConfig().override({"schedule.steps": 3})
    validate(base)
    for key, v in {"optim.lr": -1, "optim.eps": 0, "optim.beta2": 1.0, "optim.weight_decay": -0.1,
                   "batch.global_tokens": 0, "train.threads": 100000, "log.every": 0}.items():
        with pytest.raises(SpectraError, match=key.split(".")[-1]):
            validate(base.override({key: v}))
    with pytest.raises(SpectraError, match="finite"):
        base.override({"optim.lr": math.nan})


def test_threads_limit():
    from spectra.infer.kernels.build import usable_cpus

    assert V.check_threads(None) is None and V.check_threads(1) == 1
    V.check_threads(4 * usable_cpus())
    for n in (0, -4, 4 * usable_cpus() + 1, 100000, True):
        with pytest.raises(SpectraError, match="--threads"):
            V.check_threads(n)


def test_model_limits_apply_to_every_config():
    from spectra.config import ModelConfig

    with pytest.raises(SpectraError, match="limit"):
        ModelConfig(dim=1 << 20, n_layers=1, n_heads=1 << 10, ffn_dim=64).validate()
    with pytest.raises(SpectraError, match="max_seq_len"):
        ModelConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=10**12).validate(require_padded_vocab=False)


def test_data_build_shard_tokens_zero_refused(tmp_path, capsys):
    """Finding 8: --shard-tokens 0 meant 'default' while negatives were refused."""
    msg = in_process(capsys, "data", "build", "--source", "default", "--out", tmp_path / "d", "--shard-tokens", "0")
    assert "shard_tokens" in msg or "--shard-tokens" in msg
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_quantize_refuses_non_finite_weights(tmp_path, capsys, value):
    """Finding 8: quantize on NaN/Inf weights exited 0 (with a NaN QuantLM)."""
    from spectra.store import save_model

    m = Transformer(get_preset("nano").model).init_weights(1)
    with torch.no_grad():
        m.layers[1].mlp.up_proj.weight[3, 2] = float(value)
    ck = save_model(m, tmp_path / "f", "floatlm")
    msg = in_process(capsys, "quantize", ck, "--method", "rtn", "--bits", "4", "--out", tmp_path / "q")
    assert "NaN/Inf" in msg and "up_proj" in msg
    assert not (tmp_path / "q").exists()


def test_eval_tokenizer_larger_than_vocab(nano, tmp_path, capsys, shared):
    """A tokenizer with more ids than the embedding rows was an IndexError deep in torch."""
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.")
    tok = shared("tokenizer", "gpt-neox-20b.json")
    assert "vocabulary is 4096" in in_process(capsys, "eval", nano["ck"], "--ppl", f, "--tokenizer", tok)


@pytest.mark.parametrize("edit", [{"hidden_size": "128"}, {"num_attention_heads": None}, {"rope_theta": "x"},
                                  {"rope_scaling": [1]}, {"initializer_range": None}, {"architectures": "Llama"},
                                  {"pretraining_model_parallel": "2"}, {"eos_token_id": -5},
                                  {"max_position_embeddings": 10**12}, {"spectra": {"mp": 0}}])
def test_hf_config_types_checked(nano, tmp_path, edit):
    from spectra.store import read_model_config

    ck = _ck_with(nano, tmp_path / "ck", lambda c: c.update(edit))
    with pytest.raises(SpectraError, match="config"):
        read_model_config(ck)


def test_torch_engine_checks_token_ids(nano):
    """Finding 2 (library entry point): the torch backend refused nothing (IndexError / OverflowError)."""
    from spectra.infer.engine import TorchEngine
    from spectra.store import load

    eng = TorchEngine(load(nano["ck"], "model"), max_len=8)
    for bad in ([1, 4096], [-1], [10**20]):
        with pytest.raises(SpectraError, match="vocabulary"):
            eng.forward(bad)
    assert eng.pos == 0 and eng.forward([1, 2]).shape == (4096,)


def test_train_huge_model_refused_before_allocating(tmp_path, capsys):
    """Finding 4/7: a model far larger than memory (within the per-field limits) was an allocation
    failure or the OOM killer; now one line before the run directory exists."""
    from spectra.data import build_dataset

    src = tmp_path / "c.txt"
    src.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    data = build_dataset(str(src), tmp_path / "d", vocab_size=300, progress=False)
    msg = in_process(capsys, "train", "--preset", "nano", "--data", data, "--out", tmp_path / "run", "--steps", "1",
                     "model.dim=16384", "model.n_heads=128", "model.ffn_dim=65536", "model.n_layers=64")
    assert "GiB" in msg and "parameter" in msg
    assert not (tmp_path / "run" / "train_config.json").exists()
