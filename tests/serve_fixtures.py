"""Shared helpers of the tests/test_serve_*.py modules: tiny models, a tokenizer, a live server in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

VOCAB = 512  # the tokenizer's and the test model's: every id the model can emit decodes to text
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in green trees; "
         "ternary weights pack into two bits, so decode reads less memory per token. ").split()


def corpus(n_words: int = 4000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def make_tokenizer(path: Path, vocab: int = VOCAB) -> Path:
    """A byte-level BPE (GPT-style, like the Spectra tokenizer) trained on a synthetic corpus: offline and fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus()], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_models(root: Path) -> dict[str, Path]:
    """A random micro TriLM (vocab 512): the fp32 checkpoint ('ck', torch path) and its t2 packed directory ('packed')."""
    import dataclasses

    import torch

    from spectra.checkpoint import save_model
    from spectra.config import get_preset
    from spectra.infer.packed_model import write_packed
    from spectra.model import Transformer
    from spectra.ternary import to_ternary

    tok = make_tokenizer(root / "tok" / "tokenizer.json")
    m = Transformer(dataclasses.replace(get_preset("micro").model, vocab_size=VOCAB)).init_weights(3)
    with torch.no_grad():  # a larger head: clear greedy margins, so tiny float differences cannot flip a token
        m.lm_head.weight.mul_(8)
    ck = save_model(to_ternary(m, 1), root / "ck", "trilm", tokenizer=tok)
    write_packed(ck, root / "packed", "t2", "f16", progress=False)
    return {"ck": ck, "packed": root / "packed", "tokenizer": tok}


def native_batch_available() -> str | None:
    """None when the native multi-sequence engine can run here, else why not."""
    from spectra.infer import engine as eng_mod
    from spectra.infer import kernels

    if not hasattr(eng_mod, "NativeBatchEngine"):
        return "spectra.infer.engine.NativeBatchEngine is not built yet"
    try:
        kernels.available_kernels()
    except kernels.KernelUnavailable as e:
        return f"native kernel unavailable: {e}"
    return None


class LiveServer:
    """uvicorn serving one model on a free loopback port, in a thread of this process."""

    def __init__(self, model: Path, backend: str = "torch", engine=None, **cfg):
        from spectra.serve.app import ServerState
        from spectra.serve.server import ServeConfig, bind, load_into, make_server

        cfg.setdefault("max_len", 128)
        cfg.setdefault("parallel", 4)
        cfg.setdefault("threads", 1)
        cfg.setdefault("log_level", "warning")
        self.cfg = ServeConfig(str(model), port=0, backend=backend, **cfg).validate()
        self.state = ServerState("tiny", self.cfg.max_body, self.cfg.api_key)
        load_into(self.state, self.cfg, engine)
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.state, self.cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def engine(self):
        return self.state.engine

    @property
    def scheduler(self):
        return self.state.scheduler

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", self.cfg.api_key or "none")
        kw.setdefault("timeout", 60)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base + "/v1", **kw)

    def wait_idle(self, timeout: float = 20.0) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.scheduler.idle() and self.engine_active() == 0:
                return True
            time.sleep(0.05)
        return False

    def engine_active(self) -> int:
        return int(self.engine.active)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.scheduler.stop(2.0)
        self.engine.close()
        self.sock.close()
