"""``python -m spectra.harness ...``: lm-eval's own command line with the ``spectra`` model registered.

lm-eval 0.4.x discovers no third-party models, so this entry point imports
:mod:`spectra.eval` (which registers ``spectra`` in lm-eval's model registry) and then
hands the untouched argument list to lm-eval's CLI::

    python -m spectra.harness --model spectra --model_args pretrained=DIR --tasks arc_easy --limit 100
    python -m spectra.harness ls tasks

Everything after the module name is lm-eval's syntax (``--include_path`` for local
task YAMLs, ``--output_path``, ``--log_samples``, ...). (It used to be
``spectra.lm_eval``, a name that read like the lm_eval package itself.)
"""

from __future__ import annotations


def main() -> None:
    import spectra.eval  # noqa: F401  (registers the "spectra" model)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
