"""spectra serve: continuous batching (scheduler) and an OpenAI-compatible ASGI app over a batch engine.

Imports ``spectra.infer``, never ``spectra.train``. FastAPI/uvicorn (the ``serve`` extra) are
needed only by :mod:`spectra.serve.app` and :mod:`spectra.serve.server`; the scheduler is pure Python.
"""
