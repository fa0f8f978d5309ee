#!/usr/bin/env bash
# Set up spectra-lm in ./.venv on a CPU machine (idempotent, fast when already done).
#   scripts/setup.sh           core + Hugging Face + data + eval + gguf extras (the main job)
#   scripts/setup.sh --test    the above + test tools + tensorboard + llama-cpp-python (built from source, ~6 min once)
# The CPU build of torch is pinned by requirements/cpu.txt so no CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="hf,data,eval,gguf,serve,hub"
LLAMA=0
SYS=0
for a in "$@"; do
  case "$a" in
    --test) EXTRAS="$EXTRAS,dev,tensorboard"; LLAMA=1; SYS=1 ;;
    --no-llama) LLAMA=0 ;;
    *) echo "setup.sh: unknown option $a (allowed: --test, --no-llama)" >&2; exit 2 ;;
  esac
done
if [ "$SYS" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # System tools the tests use: qemu-user + an aarch64 cross compiler (the ARM kernel paths under
  # emulation) and headless Chromium (the HTML report). Tests skip with a reason where absent.
  need=""
  command -v qemu-aarch64 >/dev/null || need="$need qemu-user"
  command -v aarch64-linux-gnu-gcc >/dev/null || need="$need gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
  command -v chromium >/dev/null || need="$need chromium"
  if [ -n "$need" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null) \
      || echo "setup.sh: warning: could not install$need; the tests that need them will skip" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=".venv/.spectra-setup-$(cat pyproject.toml requirements/cpu.txt | sha1sum | cut -c1-12)-${EXTRAS//,/_}-$LLAMA"
if [ ! -f "$stamp" ]; then
  $VPY -m pip install -q -c requirements/cpu.txt "torch==2.13.0"
  $VPY -m pip install -q -c requirements/cpu.txt -e ".[${EXTRAS}]"
  if [ "$LLAMA" = 1 ]; then
    # Real llama.cpp for the GGUF and speed comparisons; built from the sdist once, then
    # pip reuses the cached wheel. Tests that need it skip with a reason if this fails.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" $VPY -m pip install -q -c requirements/cpu.txt "llama-cpp-python>=0.3" \
      || echo "setup.sh: warning: llama-cpp-python could not be built; GGUF/llama.cpp tests will skip" >&2
  fi
  rm -f .venv/.spectra-setup-*
  touch "$stamp"
else
  # Source changes never need a reinstall (editable), but the native kernel may.
  $VPY -m pip install -q --no-deps -e . >/dev/null
fi
echo "spectra-lm ready: $($VPY -m spectra --version)"
