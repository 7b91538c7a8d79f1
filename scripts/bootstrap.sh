#!/usr/bin/env bash
# Create .venv and install eqntk with everything it runs with, from a fresh machine.
# Usage: bash scripts/bootstrap.sh [extra]   (extra: "test" adds the test tools)
#
# Why not a plain `pip install .`:
#  - torch is installed first and pinned (TORCH_SPEC) so that pip never pulls a multi-GB
#    CUDA build by accident; on a CUDA machine set TORCH_SPEC and TORCH_INDEX as you like.
#  - escnn 1.0.11 is installed with --no-deps: its hard dependency py3nj only builds with a
#    Fortran compiler and only speeds up SO(3) Clebsch-Gordan coefficients. escnn's other
#    dependencies (lie_learn, pymanopt, autograd, joblib) are listed in pyproject.toml.
#  - PySCF (PYSCF_SPEC) computes the energies of the built-in molecules data set
#    (study/molecules/pyscf_energies.py); it is pinned here like torch, with wheels for Linux and macOS
#    (x86_64 and arm64), so no compiler is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYSCF_SPEC=${PYSCF_SPEC:-pyscf==2.14.0}
extra=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  .venv/bin/pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"
else
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q --no-deps "escnn==1.0.11"
if [ -n "$extra" ]; then
  .venv/bin/pip install -q -e ".[$extra]"
else
  .venv/bin/pip install -q -e .
fi
# After eqntk, so pip keeps the numpy<2 that eqntk's dependencies need.
.venv/bin/pip install -q "$PYSCF_SPEC"
# The report test opens the HTML report in headless Chromium (Debian's package).
if [ "$extra" = "test" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "bootstrap: could not install chromium; the report rendering test will be skipped" >&2
fi
