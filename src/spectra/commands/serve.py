"""spectra serve: an OpenAI-compatible HTTP server with continuous batching (any model kind)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server with continuous batching (docs/serving.md)")
    p.add_argument("model", help="packed directory (spectra pack: native engine) or any checkpoint directory (PyTorch)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--parallel", type=int, default=16, help="sequences decoded together (slots; default 16)")
    p.add_argument("--max-len", type=int, default=None, help="context per sequence, prompt + completion (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all available cores)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $SPECTRA_API_KEY)")
    from spectra.infer.backends import BACKENDS, CHOICES  # the backend table (no numpy/torch at import)

    p.add_argument("--backend", default="auto", choices=CHOICES,
                   help="auto (default: the first that fits and runs here); "
                   + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values()))
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-step-tokens", type=int, default=256,
                   help="tokens per engine step (decode rows + prompt chunks; default 256)")
    p.add_argument("--max-body", type=int, default=2 * 1024 * 1024, help="largest request body in bytes (413 past it)")
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds running requests get to finish after SIGTERM (default 5)")
    p.add_argument("--kernel", default=None, choices=["auto", "scalar", "avx2", "avxvnni", "avx512", "neon", "i8mm"],
                   help="native code path (default: $SPECTRA_KERNEL or the best the CPU supports)")
    p.add_argument("--act", default="int8x2", choices=["int8x2", "int8"],
                   help="native activation quantization (as spectra generate; default int8x2)")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of a packed file")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory name)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    from spectra.errors import SpectraError

    try:
        from spectra.serve.server import ServeConfig, api_key_from_env, serve
    except ImportError as e:
        raise SpectraError(f"spectra serve needs the 'serve' extra ({e.name} missing): pip install 'spectra-lm[serve]'") from None
    from pathlib import Path

    from spectra.store import resolve

    if not args.served_model_name and not Path(args.model).exists():
        args.served_model_name = args.model  # a Hub id OWNER/NAME is served under that name, not its snapshot's
    args.model = str(resolve(args.model))
    cfg = ServeConfig(args.model, args.host, args.port, args.parallel, args.max_len, args.threads,
                      api_key_from_env(args.api_key), args.backend, args.max_queue, args.max_step_tokens, args.max_body,
                      args.drain_timeout, args.served_model_name, args.access_log, args.log_level,
                      args.kernel, args.act, not args.no_verify)
    return serve(cfg)
