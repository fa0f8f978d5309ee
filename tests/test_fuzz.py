"""Fuzz harness (issue 15): mutated model files never crash a loader, the native engine or the CLI.

Real files (a nano TriLM checkpoint, its packed directory, a tokenizer.json, a training config)
are mutated with a seeded generator: bit flips, truncation, junk, safetensors header edits,
JSON type swaps, deleted/added keys, huge numbers, deep nesting, non-UTF-8 bytes.

* In process, every loader must either succeed or raise :class:`SpectraError`; any other exception
  type is a failure, and the input file must be unchanged (sha256 before/after).
* The native engine runs in a sandbox subprocess (memory cap, timeout) over packed models whose
  tensor bytes were flipped and loaded without checksums: no signal, every case ends ok or refused.
* Through the real CLI in subprocesses: exit 0 or 2, one line on stderr, no traceback, no signal,
  inputs unchanged.

A failing case is reproduced from its printed (kind, case number): ``_case(kind, seed, i)``.
Default run: >= 500 in-process cases; ``-m slow``: >= 10,000 and more CLI cases.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spectra.config import get_preset
from spectra.errors import SpectraError
from spectra.infer.packed_model import PackedModel, write_packed
from spectra.model import Transformer
from spectra.ternary import to_ternary

pytestmark = pytest.mark.usefixtures("one_thread")
MEM_CAP = 6 << 30
SEED = int(os.environ.get("SPECTRA_FUZZ_SEED", "1515"))

WEIRD = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, -(2**63), 10**30, 1e308, -1e308, float("inf"),
         float("nan"), 0.5, "", "x", "t2", "F32", "../x", "\u00e9", [], [0], [10**12, 1], {}, {"a": 1}]


# ----------------------------------------------------------------------------- seed files
@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzzseed"))


def make_seeds(d: Path) -> Path:
    """The real files every case starts from (deterministic: a case reproduces from its number)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from spectra.store import save_model

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(d / "tokenizer.json"))
    ck = save_model(to_ternary(Transformer(get_preset("nano").model).init_weights(7), 1), d / "ck", "trilm",
                    tokenizer=d / "tokenizer.json")
    write_packed(ck, d / "pk", "t2", "f16", progress=False)
    fl = save_model(Transformer(get_preset("nano").model).init_weights(8), d / "fl", "floatlm")
    from spectra.cli import main

    assert main(["quantize", str(fl), "--method", "rtn", "--bits", "4", "--out", str(d / "q")]) == 0
    shutil.copytree(next(p for p in (d / "q").iterdir() if p.name.endswith("-packed")), d / "qp")
    (d / "train.json").write_text(json.dumps({"model": {"preset": "nano", "family": "trilm"},
                                              "schedule": {"steps": 10, "warmup": 0.1},
                                              "optim": {"lr": 1e-3, "clip": 1.0}, "batch": {"micro_batch": 4}}))
    return d


# ----------------------------------------------------------------------------- mutations
def _weird(rng: random.Random):
    return copy.deepcopy(rng.choice(WEIRD))  # a fresh object: a shared one could form cycles (or mutate WEIRD)


def _walk(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):  # the first few elements of long lists suffice
            yield from _walk(v, path + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(obj, rng: random.Random):
    """One structural edit of a JSON tree: a type swap, a deleted/added key, a scaled number."""
    paths = list(_walk(obj))
    path = rng.choice(paths)
    if not path:
        return rng.choice([[obj], "x", 1, None, [], {"x": obj}])
    parent, key = _get(obj, path[:-1]), path[-1]
    cur = parent[key]
    op = rng.randrange(6)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[rng.choice(["x", "__metadata__", "dtype", "shape", "model", "k"])] = _weird(rng)
    elif op == 2 and isinstance(cur, (int, float)) and not isinstance(cur, bool):
        parent[key] = rng.choice([cur * 2, cur + 1, cur - 1, -cur, cur * 10**9, float(cur), 0, str(cur)])
    elif op == 3 and isinstance(cur, list) and cur:
        parent[key] = rng.choice([cur[::-1], cur[:-1], cur + cur[-1:], [cur]])
    else:
        parent[key] = _weird(rng)
    return obj


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and b:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncation
        del b[rng.randrange(len(b) + 1):]
    elif op == 2 and b:  # a run overwritten with junk
        i = rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(min(n, len(b) - i)))
    elif op == 3:  # junk appended
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # a region deleted
        i = rng.randrange(len(b) + 1)
        del b[i:i + rng.randint(1, 4096)]
    return bytes(b)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Header-length edits, header JSON edits (re-encoded with a consistent length) or raw byte damage."""
    n = int.from_bytes(data[:8], "little")
    op = rng.randrange(4)
    if op == 0:
        v = rng.choice([0, 1, 2**64 - 1, 2**63, len(data), len(data) - 8, n + 1, n - 1, n * 2])
        return v.to_bytes(8, "little") + data[8:]
    if op in (1, 2):
        h = json.loads(data[8:8 + n])
        for _ in range(rng.randint(1, 3)):
            h = mutate_json(h, rng)
        raw = json.dumps(h).encode()
        if op == 2:  # keep the old length (as an in-place edit would): pad or cut
            raw = raw[:n].ljust(n)
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return mutate_bytes(data, rng)


def mutate_json_file(data: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(10)
    if op < 6:
        obj = json.loads(data)
        for _ in range(rng.randint(1, 3)):
            obj = mutate_json(obj, rng)
        return json.dumps(obj).encode()
    if op == 6:
        return b"[" * rng.choice([10, 10000, 200000]) + b"]" * rng.choice([0, 10])
    if op == 7:
        return data.replace(b'"', b"\xff", 1)
    return mutate_bytes(data, rng)


# ----------------------------------------------------------------------------- in-process loaders
def _load_packed(d: Path):
    PackedModel.load(d, verify=True)


def _load_packed_noverify(d: Path):
    pm = PackedModel.load(d, verify=False)
    pm.matrix("layers.0.mlp.down_proj").ternary()  # unpacking reads what the C engine would read


def _load_config(d: Path):
    from spectra.store import read_model_config

    read_model_config(d)


def _load_weights(d: Path):
    from spectra.store import read_weights

    read_weights(d)


def _load_model(d: Path):
    from spectra.store import load

    load(d, "model")


def _load_tokenizer(d: Path):
    from spectra.store import load_tokenizer

    t = load_tokenizer(d, True)
    t.decode(t.encode("the fox").ids)


def _load_store_config(d: Path):
    from spectra.store import load

    load(d, "config")


def _load_tokenizer_hf(d: Path):
    from spectra.store import load_tokenizer

    t = load_tokenizer(d, True, hf=True)  # what evaluation uses
    t.decode(t("the fox")["input_ids"])


def _load_quantlm(d: Path):
    from spectra.quant.api import read_packed_state

    read_packed_state(d)


def _load_train_config(d: Path):
    from spectra.train.config import load_config_file, validate

    validate(load_config_file(d / "train.json"))


# kind -> (seed directory, file to mutate, mutation, loaders)
KINDS = {
    "packed.json": ("pk", "packed.json", mutate_json_file, (_load_packed_noverify, _load_store_config)),
    "packed.safetensors": ("pk", "model.safetensors", mutate_safetensors, (_load_packed, _load_packed_noverify)),
    "config.json": ("ck", "config.json", mutate_json_file, (_load_config, _load_model)),
    "model.safetensors": ("ck", "model.safetensors", mutate_safetensors, (_load_weights,)),
    "tokenizer.json": ("ck", "tokenizer.json", mutate_json_file, (_load_tokenizer, _load_tokenizer_hf)),
    "train.json": (".", "train.json", mutate_json_file, (_load_train_config,)),
    "quantize_config.json": ("qp", "quantize_config.json", mutate_json_file, (_load_quantlm,)),
    "quantlm.safetensors": ("qp", "model.safetensors", mutate_safetensors, (_load_quantlm,)),
}
# Loading a whole model (or a transformers tokenizer) per case is slow: those run on 1 case in 8.
_SLOW_LOADERS = {_load_model, _load_tokenizer_hf}


def _case(kind: str, seed: int, i: int, src: Path, work: Path) -> tuple[Path, Path]:
    """Copy the seed directory of ``kind`` to ``work`` and mutate its file: case ``i`` of ``seed``."""
    sub, fname, mutate, _ = KINDS[kind]
    rng = random.Random(f"{seed}-{kind}-{i}")
    if work.exists():
        shutil.rmtree(work)
    if sub == ".":
        work.mkdir()
        shutil.copyfile(src / fname, work / fname)
    else:
        shutil.copytree(src / sub, work)
    f = work / fname
    f.write_bytes(mutate(f.read_bytes(), rng))
    return work, f


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_in_process(seeds: Path, tmp: Path, n: int, seed: int = SEED) -> tuple[int, list[str]]:
    """n cases spread over the kinds; returns (loader calls, failures)."""
    failures, calls = [], 0
    kinds = sorted(KINDS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d, f = _case(kind, seed, i, seeds, tmp / "case")
        before = _sha(f)
        for loader in KINDS[kind][3]:
            if loader in _SLOW_LOADERS and i % 8:
                continue
            calls += 1
            try:
                loader(d)
            except SpectraError as e:
                if "\n" in str(e):
                    failures.append(f"{kind} case {i} {loader.__name__}: multi-line message {str(e)[:200]!r}")
            except BaseException as e:  # noqa: BLE001 - the contract: nothing but SpectraError escapes
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures.append(f"{kind} case {i} {loader.__name__}: {type(e).__name__}: {str(e)[:200]}")
        if _sha(f) != before:
            failures.append(f"{kind} case {i}: the loader modified its input file")
    return calls, failures


def test_fuzz_loaders_in_process(seeds, tmp_path):
    """>= 500 mutated files through every loader: success or SpectraError, nothing else, input untouched."""
    calls, failures = run_in_process(seeds, tmp_path, 510)
    assert calls >= 500
    assert not failures, f"{len(failures)} failures (seed {SEED}):\n" + "\n".join(failures[:20])


@pytest.mark.slow
def test_fuzz_loaders_in_process_10k(seeds, tmp_path):
    calls, failures = run_in_process(seeds, tmp_path, 10200, seed=SEED + 1)
    assert calls >= 10000
    assert not failures, f"{len(failures)} failures (seed {SEED + 1}):\n" + "\n".join(failures[:20])


# ----------------------------------------------------------------------------- native engine sandbox
_SANDBOX = textwrap.dedent("""
    import sys
    from spectra.errors import SpectraError
    from spectra.infer.backends import open_engine
    for line in sys.stdin:
        d = line.strip()
        print("start", d, flush=True)
        try:
            eng = open_engine(d, "native", verify=False, max_len=16, n_threads=1)
            eng.forward([1, 2, 3])
            eng.forward([4])
            eng.close()
            print("ok", d, flush=True)
        except SpectraError as e:
            print("refused", d, str(e).replace(chr(10), " ")[:200], flush=True)
""")


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))


def run_sandbox(seeds: Path, tmp: Path, n: int, seed: int) -> None:
    from spectra.infer import kernels

    try:
        kernels.available_kernels()
    except kernels.KernelUnavailable as e:
        pytest.skip(f"native kernel unavailable: {e}")
    dirs = []
    for i in range(n):
        # tensor bytes damaged (checksums skipped, so the engine runs on them) or packed.json edited
        kind = "packed.safetensors" if i % 3 else "packed.json"
        d, _ = _case(kind, seed, i, seeds, tmp / f"s{i}")
        dirs.append(str(d))
    r = subprocess.run([sys.executable, "-c", _SANDBOX], input="\n".join(dirs) + "\n", capture_output=True,
                       text=True, timeout=600, preexec_fn=_cap_memory)
    done = [ln.split(" ", 2)[1] for ln in r.stdout.splitlines() if ln.startswith(("ok ", "refused "))]
    started = [ln.split(" ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("start ")]
    crashed = started[-1] if len(started) > len(done) else None
    assert r.returncode == 0 and len(done) == n, \
        f"rc {r.returncode}, {len(done)}/{n} cases done; crashed on {crashed}\n{r.stderr[-3000:]}"
    assert any(ln.startswith("ok ") for ln in r.stdout.splitlines())  # some damaged models do run


def test_fuzz_native_engine_sandbox(seeds, tmp_path):
    """The C engine on 60 damaged packed models (no checksums): no signal, every case ok or refused."""
    run_sandbox(seeds, tmp_path, 60, SEED)


@pytest.mark.slow
def test_fuzz_native_engine_sandbox_many(seeds, tmp_path):
    run_sandbox(seeds, tmp_path, 1500, SEED + 2)


# ----------------------------------------------------------------------------- the real CLI
def _cli(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "spectra", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_cap_memory, env=env, cwd=cwd)


def _cli_cases(n: int, seed: int):
    """(kind, case, argv builder): generate on packed/checkpoint dirs, pack and eval on checkpoints."""
    plan = [("packed.json", lambda d, o: ["generate", d, "--prompt-ids", "1,2", "--max-new-tokens", "2"]),
            ("packed.safetensors", lambda d, o: ["generate", d, "--prompt-ids", "1,2", "--max-new-tokens", "2"]),
            ("config.json", lambda d, o: ["generate", d, "--prompt-ids", "1,2", "--max-new-tokens", "2",
                                          "--backend", "torch"]),
            ("model.safetensors", lambda d, o: ["pack", d, "--out", o]),
            ("tokenizer.json", lambda d, o: ["generate", d, "--prompt", "the fox", "--max-new-tokens", "2",
                                             "--backend", "torch"]),
            ("config.json", lambda d, o: ["export", d, "--to", "hf", "--out", o])]
    for i in range(n):
        kind, argv = plan[i % len(plan)]
        yield kind, i + seed, argv


def run_cli(seeds: Path, tmp: Path, n: int, seed: int) -> None:
    failures = []
    for kind, i, argv in _cli_cases(n, seed):
        d, f = _case(kind, seed, i, seeds, tmp / f"c{i}")
        hashes = {p.name: _sha(p) for p in d.iterdir() if p.is_file()}
        r = _cli(argv(d, tmp / f"out{i}"), tmp)
        # the error is one line; progress bars (tqdm: 'pack t2:  43%|...') and '[engine] speed' lines are not errors
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("[", "spectra: warning"))
                 and not re.search(r"\d+%\|", ln)]
        what = f"{kind} case {i} ({' '.join(map(str, argv(d, 'OUT')[:1]))})"
        if r.returncode not in (0, 2):
            failures.append(f"{what}: exit {r.returncode}\n{r.stderr[-1500:]}")
        elif "Traceback" in r.stderr or (r.returncode == 2 and len(lines) != 1):
            failures.append(f"{what}: not one line\n{r.stderr[-1500:]}")
        if {p.name: _sha(p) for p in d.iterdir() if p.is_file()} != hashes:
            failures.append(f"{what}: input files changed")
    assert not failures, "\n".join(failures[:10])


def test_fuzz_cli(seeds, tmp_path):
    """A few damaged inputs through `python -m spectra`: exit 0 or 2 with one line, never a signal."""
    run_cli(seeds, tmp_path, 6, SEED)


@pytest.mark.slow
def test_fuzz_cli_many(seeds, tmp_path):
    run_cli(seeds, tmp_path, 120, SEED + 3)
