"""One module per CLI subcommand (see spectra.cli)."""
