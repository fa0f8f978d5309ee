"""Run the server: bind (loopback unless an API key is set), load the model in the background, drain on SIGTERM.

The socket is bound before the model loads, so ``GET /health`` answers 503 ("loading")
at once and 200 when the engine is ready. SIGTERM/SIGINT stop new connections and
new requests; running requests get ``drain_timeout`` seconds to finish, then end with
an error event; the process exits within ``drain_timeout + 2`` seconds.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from spectra.errors import SpectraError
from spectra.serve.app import DEFAULT_MAX_BODY, ServerState, build_asgi

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 16
    max_len: int | None = None
    threads: int | None = None
    api_key: str | None = None
    backend: str = "auto"
    max_queue: int = 64
    max_step_tokens: int = 256
    max_body: int = DEFAULT_MAX_BODY
    drain_timeout: float = 5.0
    served_model_name: str | None = None
    access_log: bool = False
    log_level: str = "info"
    kernel: str | None = None  # native only: code path (default: the best the CPU supports)
    act: str = "int8x2"  # native only: activation quantization (as spectra generate)
    verify: bool = True  # native only: checksum the packed file at load

    def validate(self) -> "ServeConfig":
        for name in ("parallel", "max_queue", "max_step_tokens", "max_body"):
            if getattr(self, name) < 1:
                raise SpectraError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 2:
            raise SpectraError(f"--max-len must be >= 2, got {self.max_len}")
        if not 0 <= self.port <= 65535:
            raise SpectraError(f"--port must be in 0..65535, got {self.port}")
        if self.drain_timeout < 0:
            raise SpectraError("--drain-timeout must be >= 0")
        if not is_loopback(self.host) and not self.api_key:
            raise SpectraError(f"binding to '{self.host}' exposes the server beyond this machine: set --api-key "
                               f"(or SPECTRA_API_KEY), or bind 127.0.0.1")
        if not Path(self.model).is_dir():
            raise SpectraError(f"model '{self.model}' is not a directory (a packed directory or a checkpoint directory)")
        return self


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_eos(path: Path) -> int | None:
    """End-of-text id from packed.json or config.json (None when the model names none)."""
    from spectra.store import load

    meta = load(path, "meta")
    v = meta.get("eos_token_id") if isinstance(meta, dict) else None
    v = v[0] if isinstance(v, list) and v else v
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def load_into(state: ServerState, cfg: ServeConfig, engine=None) -> None:
    """Load engine, tokenizer, chat template; start the scheduler; mark the state ready."""
    from spectra.serve.chat import ChatTemplate
    from spectra.store.tokenizer import load_tokenizer
    from spectra.serve.scheduler import Scheduler

    path = Path(cfg.model)
    if engine is None:
        engine = open_engine(cfg)
    state.engine = engine
    state.tokenizer = load_tokenizer(path, required=False)  # none: token-id prompts only
    state.template = ChatTemplate.for_model(path)
    state.scheduler = Scheduler(engine, state.tokenizer, model_eos(path), cfg.parallel, cfg.max_queue,
                                state.metrics).start()
    state.ready = True


def open_engine(cfg: ServeConfig):
    """The batch engine from the backend table: native for a packed directory (auto falls back to torch)."""
    from spectra.infer.backends import open_batch_engine

    return open_batch_engine(cfg.model, cfg.backend, max_seqs=cfg.parallel, max_len=cfg.max_len,
                             n_threads=cfg.threads, max_step_tokens=max(cfg.max_step_tokens, cfg.parallel),
                             kernel=cfg.kernel, act=cfg.act, verify=cfg.verify)


def bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise SpectraError(f"cannot bind {host}:{port}: {e.strerror or e}; choose another --port") from None
    sock.set_inheritable(True)
    return sock


def make_server(state: ServerState, cfg: ServeConfig):
    """A uvicorn.Server whose SIGTERM/SIGINT handler also starts the scheduler's drain."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.scheduler is not None and not state.scheduler.draining:
                print("spectra serve: draining (no new requests; running ones get "
                      f"{cfg.drain_timeout:g}s)", file=sys.stderr, flush=True)
                state.scheduler.drain(cfg.drain_timeout)
            super().handle_exit(sig, frame)

    ucfg = uvicorn.Config(build_asgi(state), lifespan="off", log_level=cfg.log_level, access_log=cfg.access_log,
                          timeout_graceful_shutdown=int(cfg.drain_timeout + 2), timeout_keep_alive=5)
    return _Server(ucfg)


def serve(cfg: ServeConfig) -> int:
    cfg.validate()
    state = ServerState(cfg.served_model_name or Path(cfg.model).resolve().name, cfg.max_body, cfg.api_key)
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    server = make_server(state, cfg)
    failure: list[BaseException] = []

    def loader():
        try:
            load_into(state, cfg)
            print(f"spectra serve: ready: model '{state.model_id}' [{state.engine.describe()}], "
                  f"{state.scheduler.parallel} parallel, context {state.engine.max_len}", file=sys.stderr, flush=True)
        except BaseException as e:  # report after the server stops
            failure.append(e)
            server.should_exit = True

    shown = f"[{host}]" if ":" in host else host
    print(f"spectra serve: listening on http://{shown}:{port} (loading {cfg.model})", file=sys.stderr, flush=True)
    threading.Thread(target=loader, name="spectra-load", daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises a caught SIGTERM once it has shut down (restoring the handler it found);
        # after a complete drain that should be a normal exit (status 0), so the handler it restores is a no-op.
        signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop(timeout=2.0)
        if state.engine is not None:
            state.engine.close()
        sock.close()
    if failure:
        e = failure[0]
        if isinstance(e, SpectraError):
            raise e
        raise SpectraError(f"loading '{cfg.model}' failed: {type(e).__name__}: {e}") from e
    return 0


def api_key_from_env(value: str | None) -> str | None:
    return value or os.environ.get("SPECTRA_API_KEY") or None


__all__ = ["ServeConfig", "bind", "is_loopback", "load_into", "make_server", "model_eos", "serve"]
