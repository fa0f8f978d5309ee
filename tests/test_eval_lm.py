"""The `spectra` lm-eval model against lm-eval's own `hf` model on a random HF Llama dir."""

import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra; scripts/setup.sh installs it)")
pytest.importorskip("transformers", reason="transformers not installed (the hf extra; scripts/setup.sh installs it)")
pytest.importorskip("accelerate", reason="accelerate not installed (lm-eval's hf backend needs it; scripts/setup.sh --test installs it)")

import spectra.eval  # noqa: E402  (registers "spectra")
from spectra.eval import scoring  # noqa: E402
from helpers.random_llama import make_random_llama  # noqa: E402
from spectra.eval.perplexity import window_requests  # noqa: E402
from conftest import Req  # noqa: E402

TASKS = ["arc_easy", "piqa", "winogrande", "boolq", "lambada_openai"]
LIMIT = 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    from conftest import shared_data

    tok = shared_data("tokenizer", "gpt-neox-20b.json")
    return make_random_llama(tmp_path_factory.mktemp("llama") / "tiny", tok)


@pytest.fixture(scope="module")
def both(tiny):
    """(spectra results, hf results) of one lm-eval run each on local data, with samples."""
    from lm_eval.tasks import TaskManager

    from spectra.eval.tasks import write_local_tasks
    from conftest import shared_data

    data = shared_data("eval")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_local_tasks(TASKS, data, tmp)
        tm = TaskManager(include_path=tmp, include_defaults=False)
        out = {}
        for name, args in (("spectra", {"pretrained": str(tiny)}),
                           ("hf", {"pretrained": str(tiny), "device": "cpu", "dtype": "float32"})):
            out[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=TASKS, task_manager=tm,
                                                limit=LIMIT, bootstrap_iters=0, log_samples=True, batch_size=8)
    return out


def test_loglikelihoods_match_hf(both):
    n = 0
    for t in TASKS:
        ours, ref = both["spectra"]["samples"][t], both["hf"]["samples"][t]
        assert len(ours) == len(ref) == LIMIT
        for a, b in zip(ours, ref):
            assert a["doc_id"] == b["doc_id"]
            for (ra,), (rb,) in zip(a["resps"], b["resps"]):
                ll_a, greedy_a = ra
                ll_b, greedy_b = rb
                assert abs(ll_a - ll_b) <= 1e-4, (t, a["doc_id"], ll_a, ll_b)
                assert greedy_a == greedy_b
                n += 1
    assert n > 100  # multiple choice: several requests per doc


def test_metrics_identical_to_hf(both):
    for t in TASKS:
        ours, ref = both["spectra"]["results"][t], both["hf"]["results"][t]
        metrics = [k for k in ref if k.startswith(("acc,", "acc_norm,"))]
        assert metrics, t
        for k in metrics:
            assert ours[k] == ref[k], (t, k, ours[k], ref[k])


def test_loglikelihood_rolling_equals_direct(tiny):
    from spectra.eval.lm import SpectraLM

    assert torch.is_grad_enabled()
    lm = SpectraLM(pretrained=str(tiny))
    text = "The quick brown fox jumps over the lazy dog. " * 4
    (ll,) = lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    ids = [lm.prefix_token_id] + lm.tokenizer.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]])).float(), -1)[0]
    direct = logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert abs(ll - direct) < 1e-3
    # perplexity() on a file of this text = exp(mean NLL)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    res = spectra.eval.perplexity(str(tiny), [f.name], seq_len=512)[f.name]
    n = len(ids) - 1
    assert res["tokens"] == n
    assert math.isclose(res["ppl"], math.exp(-direct / n), rel_tol=1e-5)
    assert math.isclose(res["bits_per_byte"], -direct / (math.log(2) * len(text.encode())), rel_tol=1e-5)
    os.unlink(f.name)
    assert torch.is_grad_enabled()  # evaluation inside a training process leaves autograd alone


def test_rolling_windows_match_hf_when_text_exceeds_context(tiny):
    """Disjoint windows (stride = seq_len) reproduce hf's loglikelihood_rolling with the same max_length."""
    from lm_eval.models.huggingface import HFLM

    from spectra.eval.lm import SpectraLM

    text = " ".join(f"word{i} is number {i}." for i in range(60))  # several 64-token windows
    ours = SpectraLM(pretrained=str(tiny), max_length=64)
    ref = HFLM(pretrained=str(tiny), device="cpu", dtype="float32", max_length=64, batch_size=4)
    (a,) = ours.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    (b,) = ref.loglikelihood_rolling([Req(text)], disable_tqdm=True)
    assert abs(a - b) < 1e-3
    p = window_requests(ours.tok_encode(text), ours.prefix_token_id, 64, 64)
    assert len(p) > 3
    c = sum(ll for ll, _ in scoring.score(ours.model, p, max_length=64))
    assert abs(c - a) < 1e-3


def test_window_requests_cover_every_token_once():
    ids = list(range(100, 357))
    for seq_len, stride in ((64, 64), (64, 16), (32, 1), (300, 300)):
        reqs = window_requests(ids, 0, seq_len, stride)
        conts = [t for _, c in reqs for t in c]
        assert conts == ids
        for ctx, cont in reqs:
            assert ctx and len(ctx) + len(cont) - 1 <= seq_len
            if stride < seq_len and len(ctx) < seq_len - stride:  # only at the start of the text
                assert ctx[0] == 0


def test_tree_batching_equals_one_request_at_a_time(tiny):
    """Shared-prefix rows, batching and padding do not change any score."""
    from spectra.checkpoint import load_model

    model, _ = load_model(tiny)
    g = torch.Generator().manual_seed(0)
    ctxs = [torch.randint(1, 50000, (n,), generator=g).tolist() for n in (5, 17, 1, 40)]
    reqs = [(c, torch.randint(1, 50000, (k,), generator=g).tolist()) for c in ctxs for k in (1, 3, 7)]
    reqs.append((ctxs[1], reqs[4][1]))  # an exact duplicate
    batched = scoring.score(model, reqs, max_length=48, batch_size=3, max_batch_tokens=64)
    for (ctx, cont), (ll, greedy) in zip(reqs, batched):
        full = (ctx + cont)[-49:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0, -len(cont):]
        ref = logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(ll - ref) < 1e-4
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    rows = scoring.plan_rows(reqs, 48)
    assert len(rows) < len(reqs)  # prefixes were shared


def test_generate_until_stops_at_stop_strings(tiny):
    from lm_eval.models.huggingface import HFLM

    from spectra.eval.lm import SpectraLM

    lm = SpectraLM(pretrained=str(tiny))
    ctx = "Question: What is the capital of France?\nAnswer:"
    (free,) = lm.generate_until([Req(ctx, {"until": [], "max_gen_toks": 24, "do_sample": False})], disable_tqdm=True)
    assert len(free) > 12
    stop = free[6:9]
    (cut,) = lm.generate_until([Req(ctx, {"until": [stop], "max_gen_toks": 24, "do_sample": False})],
                               disable_tqdm=True)
    assert cut == free.split(stop)[0]
    assert stop not in cut
    ref = HFLM(pretrained=str(tiny), device="cpu", dtype="float32", batch_size=1)
    reqs = [Req(ctx, {"until": [stop], "max_gen_toks": 24, "do_sample": False}),
            Req("Once upon a time", {"until": ["\n", "."], "max_gen_toks": 16, "do_sample": False})]
    assert lm.generate_until(reqs, disable_tqdm=True) == ref.generate_until(reqs, disable_tqdm=True)
