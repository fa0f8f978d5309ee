"""Multi-sequence native engine: batch invariance bit for bit, slots, argument checks (Python and C)."""

import ctypes

import numpy as np
import pytest

from spectra.errors import SpectraError

from spectra.infer import kernels  # noqa: E402  (our own module: an import error must fail)
try:
    AVAILABLE = kernels.available_kernels()
except kernels.KernelUnavailable as e:  # no C compiler: the torch batch path is tested elsewhere
    pytest.skip(f"native kernel unavailable: {e}", allow_module_level=True)

from spectra.infer.batch import BatchEngine, load_batch_engine  # noqa: E402
from spectra.infer.engine import NativeBatchEngine, NativeEngine, load_engine  # noqa: E402
from spectra.infer.packed_model import PackedModel  # noqa: E402

VOCAB = 1003


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A random 2-layer TriLM whose sizes are not multiples of the tiles (dim 192, ffn 300, vocab 1003,
    mp 3 shards), packed t2/f16 and t1/q8: rows land in the 4-row tiles and in the tails."""
    from spectra.checkpoint import save_model
    from spectra.config import ModelConfig
    from spectra.infer.packed_model import write_packed
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    d = tmp_path_factory.mktemp("odd")
    cfg = ModelConfig(dim=192, n_layers=2, n_heads=3, ffn_dim=300, vocab_size=VOCAB, mp=3, max_seq_len=128)
    ck = save_model(to_ternary(Transformer(cfg).init_weights(5), cfg.mp), d / "ck", "trilm")
    write_packed(ck, d / "t2", "t2", "f16", progress=False)
    write_packed(ck, d / "t1", "t1", "q8", progress=False)
    return {"t2": PackedModel.load(d / "t2"), "t1": PackedModel.load(d / "t1"), "dir": d}


N_SEQ, N_DECODE, CHUNK = 16, 6, 7
RNG = np.random.default_rng(11)
PROMPTS = [[int(t) for t in RNG.integers(0, VOCAB, 1 + (5 * i) % 23)] for i in range(N_SEQ)]
DECODES = [[int(t) for t in RNG.integers(0, VOCAB, N_DECODE)] for _ in range(N_SEQ)]


def _alone(eng) -> list[list[np.ndarray]]:
    """Each sequence by itself: whole prompt in one step, then one token per step; then the slot is released."""
    out = []
    for p, dec in zip(PROMPTS, DECODES):
        s = eng.acquire()
        seq = [eng.step([(s, p)])[0]]
        seq += [eng.step([(s, [t])])[0] for t in dec]
        eng.release(s)
        out.append(seq)
    return out


def _together(eng) -> list[list[np.ndarray]]:
    """All 16 in shared steps: sequence i joins at step i // 2, prefills in chunks of CHUNK tokens,
    then decodes; so a step mixes prompt chunks and decode tokens at many different positions."""
    slots = [eng.acquire() for _ in range(N_SEQ)]
    done_prompt = [0] * N_SEQ
    n_dec = [0] * N_SEQ
    out: list[list[np.ndarray]] = [[] for _ in range(N_SEQ)]
    step = 0
    while any(n < N_DECODE for n in n_dec):
        items, who = [], []
        for i in range(min(N_SEQ, step // 2 + 1)):
            if done_prompt[i] < len(PROMPTS[i]):
                items.append((slots[i], PROMPTS[i][done_prompt[i]: done_prompt[i] + CHUNK]))
            elif n_dec[i] < N_DECODE:
                items.append((slots[i], [DECODES[i][n_dec[i]]]))
            else:
                continue
            who.append(i)
        logits = eng.step(items[::-1] if step % 2 else items)  # item order must not matter either
        if step % 2:
            logits = logits[::-1]
        for (slot, toks), i, lg in zip(items, who, logits):
            if done_prompt[i] < len(PROMPTS[i]):
                done_prompt[i] += len(toks)
                if done_prompt[i] == len(PROMPTS[i]):
                    out[i].append(lg)  # logits of the prompt's last token
            else:
                n_dec[i] += 1
                out[i].append(lg)
        step += 1
    for s in slots:
        eng.release(s)
    assert eng.active == 0
    return out


@pytest.mark.parametrize("fmt,kv", [("t2", "f32"), ("t1", "f32"), ("t2", "f16")])
def test_batch_invariance_bitwise(odd, fmt, kv):
    """16 sequences stepped together == each alone, bit for bit, on every kernel path here and 1 vs 2 threads."""
    results = {}
    for kern in AVAILABLE:
        for threads in (1, 2):
            eng = NativeBatchEngine(odd[fmt], max_seqs=N_SEQ, max_len=64, n_threads=threads, max_step_tokens=128,
                                    kernel=kern, kv=kv)
            alone, together = _alone(eng), _together(eng)
            eng.close()
            for i in range(N_SEQ):
                assert len(alone[i]) == len(together[i]) == N_DECODE + 1
                for j, (a, b) in enumerate(zip(alone[i], together[i])):
                    assert np.array_equal(a, b), (kern, threads, i, j, float(np.abs(a - b).max()))
            results[kern, threads] = alone
        for i in range(N_SEQ):  # the thread count changes nothing either
            assert all(np.array_equal(a, b) for a, b in zip(results[kern, 1][i], results[kern, 2][i])), (kern, i)
    # not vacuous: different sequences and positions give different logits, and the paths differ slightly
    assert not np.array_equal(results[AVAILABLE[0], 1][0][0], results[AVAILABLE[0], 1][1][0])
    ref = results["scalar", 1][3][-1]
    for kern in AVAILABLE:
        np.testing.assert_allclose(results[kern, 1][3][-1], ref, atol=1e-3 * np.abs(ref).max())


def test_all_logits_rows_match_single_steps(odd):
    """all_logits returns every row item after item, equal to feeding the tokens one by one."""
    eng = NativeBatchEngine(odd["t2"], max_seqs=3, max_len=64, n_threads=2, max_step_tokens=32)
    a, b = eng.acquire(), eng.acquire()
    full = eng.step([(a, PROMPTS[3]), (b, PROMPTS[5])], all_logits=True)
    assert full.shape == (len(PROMPTS[3]) + len(PROMPTS[5]), VOCAB)
    c = eng.acquire()
    singles = [eng.step([(c, [t])])[0] for t in PROMPTS[5]]
    assert all(np.array_equal(x, y) for x, y in zip(full[len(PROMPTS[3]):], singles))
    assert eng.length(a) == len(PROMPTS[3]) and eng.length(b) == eng.length(c) == len(PROMPTS[5])


def test_native_engine_is_slot_view(odd):
    """NativeEngine (generate/eval) is the batch-of-one case: same bits as a slot of the batch engine;
    set_pos rewinds the cache (shared-prefix reuse)."""
    one = NativeEngine(odd["t1"], max_len=64, n_threads=2, max_batch=5)
    eng = NativeBatchEngine(odd["t1"], max_seqs=4, max_len=64, n_threads=2, max_step_tokens=64)
    s0, s = eng.acquire(), eng.acquire()
    eng.step([(s0, PROMPTS[7][:3])])
    p = PROMPTS[9]
    got = one.forward(p, all_logits=True)  # chunks of 5 rows
    want = eng.step([(s, p)], all_logits=True)  # one step, next to another slot's cache
    assert np.array_equal(got, want) and one.pos == len(p)
    one.set_pos(4)
    assert one.pos == 4
    assert np.array_equal(one.forward(p[4:]), want[-1])
    with pytest.raises(SpectraError, match="within"):
        one.set_pos(len(p) + 1)
    one.reset()
    assert one.pos == 0 and np.array_equal(one.forward(p), want[-1])
    with pytest.raises(SpectraError, match="context full"):
        one.forward(list(range(64)))
    with pytest.raises(SpectraError, match="out of range"):
        one.forward([VOCAB])
    one.close()


def _lengths(eng, slots):
    return [eng.length(s) for s in slots]


def test_argument_errors_leave_state_unchanged(odd):
    eng = NativeBatchEngine(odd["t2"], max_seqs=3, max_len=16, n_threads=2, max_step_tokens=8)
    a, b = eng.acquire(), eng.acquire()
    first = eng.step([(a, [1, 2, 3]), (b, [4])])
    before = _lengths(eng, [a, b])
    bad = [
        ([(5, [1])], "bad slot"),                     # out of range
        ([(-1, [1])], "bad slot"),
        ([(2, [1])], "not in use"),                   # never acquired
        ([(a, [1]), (a, [2])], "twice"),
        ([(a, [1]), (b, [VOCAB])], "out of range"),   # one bad item spoils the whole step
        ([(a, [-1])], "out of range"),
        ([(a, [1]), (b, [])], "at least one token"),
        ([(a, [1] * 5), (b, [1] * 4)], "max_step_tokens"),
        ([(a, [1] * 8), (b, [1])], "max_step_tokens"),
        ([(b, [1] * 8), (a, [1] * 6)], "max_step_tokens"),
        ([(a, [1.5])], "integers"),
        ([], "at least one"),
    ]
    for items, msg in bad:
        with pytest.raises(SpectraError, match=msg):
            eng.step(items)
        assert _lengths(eng, [a, b]) == before, items
    eng.step([(a, [1] * 8)])
    eng.step([(a, [1] * 4)])
    with pytest.raises(SpectraError, match="context full"):
        eng.step([(b, [1]), (a, [1] * 2)])
    assert _lengths(eng, [a, b]) == [15, 1]
    # the caches are intact: b continues exactly as a fresh sequence with the same tokens would
    c = eng.acquire()
    ref = eng.step([(c, [4, 9])])[0]
    assert np.array_equal(eng.step([(b, [9])])[0], ref)
    with pytest.raises(SpectraError, match="in use"):
        eng.acquire()
    eng.release(c)
    with pytest.raises(SpectraError, match="not in use"):
        eng.release(c)
    with pytest.raises(SpectraError, match="within"):
        eng.truncate(a, 16)
    assert not np.array_equal(first[0], first[1])
    eng.close()
    with pytest.raises(SpectraError, match="closed"):
        eng.acquire()
    eng.close()  # twice is harmless


def test_released_slot_starts_empty(odd):
    eng = NativeBatchEngine(odd["t1"], max_seqs=2, max_len=32, n_threads=2, max_step_tokens=32)
    a = eng.acquire()
    fresh = eng.step([(a, PROMPTS[4])])[0]
    eng.step([(a, PROMPTS[6])])
    eng.release(a)
    a2 = eng.acquire()
    assert a2 == a and eng.length(a2) == 0
    assert np.array_equal(eng.step([(a2, PROMPTS[4])])[0], fresh)  # the old cache is not seen


def test_c_entry_points_check_their_arguments(odd):
    """Defence in depth: spx_step / spx_slot_* refuse bad input by themselves (negative codes), state untouched."""
    eng = NativeBatchEngine(odd["t2"], max_seqs=2, max_len=8, n_threads=1, max_step_tokens=4)
    lib, st = eng.lib, eng._state
    a = eng.acquire()
    eng.step([(a, [1, 2])])
    out = np.zeros((8, VOCAB), np.float32)

    def call(slots, counts, toks):
        s_, c_, t_ = (np.asarray(v, np.int32) for v in (slots, counts, toks))
        return lib.spx_step(st, len(s_), s_.ctypes.data, c_.ctypes.data, t_.ctypes.data, out.ctypes.data, 0)

    assert call([2], [1], [1]) == -6 and call([-1], [1], [1]) == -6       # slot range
    assert call([0, 1, 0], [1, 1, 1], [1, 1, 1]) == -6                    # more items than slots
    assert call([0, 1], [3, 2], [1] * 5) == -1                            # rows > max_step_tokens
    assert call([0], [0], [1]) == -1                                      # empty item
    assert call([0], [1], [VOCAB]) == -3 and call([0], [1], [-5]) == -3   # token ids
    assert lib.spx_slot_len(st, 0) == 2
    assert call([0], [4], [1, 1, 1, 1]) == 0 and lib.spx_slot_len(st, 0) == 6
    assert call([0], [3], [1, 1, 1]) == -2 and lib.spx_slot_len(st, 0) == 6  # 6 + 3 > max_len
    assert call([1, 1], [1, 1], [1, 1]) == -7 and lib.spx_slot_len(st, 1) == 0  # duplicate slot
    assert lib.spx_step(st, 1, None, None, None, None, 0) == -8
    assert lib.spx_slot_len(st, 7) == -6 and lib.spx_slot_set_len(st, 0, 7) == -8
    assert lib.spx_slot_set_len(st, 0, -1) == -8 and lib.spx_slot_len(st, 0) == 6
    eng.close()


def test_state_allocation_refused_cleanly(odd):
    from spectra.infer.kernels.build import kernel_id

    eng = NativeBatchEngine(odd["t2"], max_seqs=1, max_len=8, n_threads=1, max_step_tokens=2)
    lib, m = eng.lib, ctypes.byref(eng._model)
    k = kernel_id(eng.kernel)
    assert not lib.spx_state_new(m, 2, 8, 1 << 17, 1, k, 1, 0)   # too many slots
    assert not lib.spx_state_new(m, 0, 8, 1, 1, k, 1, 0)         # no rows
    assert not lib.spx_state_new(m, 2, 9, 1, 1, k, 1, 0)         # past the RoPE table
    assert not lib.spx_state_new(m, 2, 8, 1, 1, k, 3, 0)         # activation levels
    assert not lib.spx_state_new(m, 2, 8, 1, 1, k, 1, 2)         # KV-cache type
    for bad in (dict(max_seqs=0), dict(max_step_tokens=-1), dict(max_seqs=2.5), dict(n_threads=-1), dict(kv="f8")):
        with pytest.raises(SpectraError):
            NativeBatchEngine(odd["t2"], **{"max_len": 8, **bad})
    with pytest.raises(SpectraError, match="lower"):  # a KV cache larger than this machine's memory
        NativeBatchEngine(odd["t2"], max_seqs=1 << 16, max_len=4096, n_threads=1, max_step_tokens=2)


def test_load_batch_engine_native(odd):
    eng = load_batch_engine(odd["dir"] / "t2", max_seqs=2, max_len=32, n_threads=1, max_step_tokens=16)
    assert isinstance(eng, NativeBatchEngine) and isinstance(eng, BatchEngine)
    assert eng.backend == "native" and eng.batch_invariant and eng.vocab_size == VOCAB and eng.max_len == 32
    assert eng.max_seqs == 2 and eng.max_step_tokens == 16 and "2 slots" in eng.describe()
    s = eng.acquire()
    single = load_engine(odd["dir"] / "t2", "native", max_len=32, n_threads=1)
    assert np.array_equal(eng.step([(s, PROMPTS[2])])[0], single.forward(PROMPTS[2]))
    eng.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="Linux only (/proc, madvise)")
def test_release_returns_kv_memory(odd):
    """A released slot hands its KV pages back: a server's memory follows the live sequences."""
    eng = NativeBatchEngine(odd["t2"], max_seqs=2, max_len=2048, n_threads=1, max_step_tokens=512)
    per_slot = 2 * 4 * 2 * 3 * 64 * 2048  # K and V, 2 layers x 3 heads x 64 x 2048 positions, fp32: 6 MiB
    a = eng.acquire()
    r0 = _rss()
    for i in range(4):
        eng.step([(a, [(7 * i + j) % VOCAB for j in range(512)])])
    r1 = _rss()
    assert r1 - r0 > per_slot * 0.6  # the cache was touched
    eng.release(a)
    assert r1 - _rss() > per_slot * 0.6  # ... and given back
    b = eng.acquire()
    assert eng.length(b) == 0 and eng.step([(b, [1, 2])]).shape == (1, VOCAB)
    eng.close()


def test_f16_kv_cache_close_to_f32(odd):
    """kv='f16' stores K/V rounded to f16 (half the attention traffic): close to the f32 cache, not equal."""
    got = {}
    for kv in ("f32", "f16"):
        eng = NativeBatchEngine(odd["t2"], max_seqs=2, max_len=64, n_threads=2, max_step_tokens=64, kv=kv)
        s = eng.acquire()
        got[kv] = np.concatenate([eng.step([(s, PROMPTS[8])], all_logits=True), eng.step([(s, DECODES[8])], all_logits=True)])
        assert f"kv {kv}" in eng.describe()
        eng.close()
    err = np.abs(got["f16"] - got["f32"]).max()
    assert 0 < err < 2e-2 * np.abs(got["f32"]).max(), err
