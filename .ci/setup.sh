#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with torch and the build/test
# dependencies, then builds and installs gnflex into it (non-editable).
# Sourced by .ci/test and .ci/demo; safe to run again.
#
#   GNFLEX_VENV    venv location (default: <repo>/.venv)
#   GNFLEX_TORCH   torch requirement (default: torch==2.14.1, a CUDA 13.0 build)
#   GNFLEX_CUDA    1/0 to force the CUDA build on/off (default: when nvcc is found)
#   GNFLEX_REBUILD 1 to rebuild even when the installed build matches the sources
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GNFLEX_VENV:-$REPO/.venv}"
TORCH_REQ="${GNFLEX_TORCH:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== installing $TORCH_REQ and build/test dependencies"
"$PY" -m pip install -q "$TORCH_REQ"
# Every other dependency is listed once, in pyproject.toml: the build
# requirements and the extras test, demo, export and interop (models for the
# conversion tests). torch stays pinned to what is installed (torchvision must
# match it); export and interop only with the default torch, the one their
# wheels here are built for.
EXTRAS="test demo"
if [ "$TORCH_REQ" = "torch==2.14.1" ]; then
  EXTRAS="$EXTRAS export interop"
fi
mapfile -t REQS < <("$PY" - "$REPO/pyproject.toml" $EXTRAS <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
reqs = [r for r in project["build-system"]["requires"] if not r.startswith("torch")]
reqs += [r for extra in sys.argv[2:] for r in project["project"]["optional-dependencies"][extra]]
print("\n".join(dict.fromkeys(reqs)))
EOF
)
"$PY" -m pip install -q -c <(echo "torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')") "${REQS[@]}"

# The CUDA toolkit lives here on our machines; torch would otherwise guess /usr/local.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# With a toolkit and a CUDA build of torch, the CUDA kernels must build: a
# silent fallback to CPU-only would hide a broken .cu file.
if [ -z "${GNFLEX_CUDA:-}" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] \
   && "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  export GNFLEX_CUDA=1
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# Skip the build (minutes with CUDA) when the installed gnflex was built from
# exactly these files and settings against this torch; GNFLEX_REBUILD=1 forces it.
installed_is_current() {
  [ -z "${GNFLEX_REBUILD:-}" ] || return 1
  local want
  want="$("$PY" "$REPO/gnflex/_sources.py" "$REPO")"
  (cd / && "$PY" - "$want" <<'EOF'
import importlib.util, os, runpy, sys
import torch
spec = importlib.util.find_spec("gnflex")
info_path = spec and os.path.join(os.path.dirname(spec.origin), "_build_info.py")
info = runpy.run_path(info_path) if info_path and os.path.exists(info_path) else {}
sys.exit(0 if info.get("source_fingerprint") == sys.argv[1] and info.get("torch_version") == torch.__version__ else 1)
EOF
  )
}
if installed_is_current; then
  echo "== gnflex is already installed from these sources (GNFLEX_REBUILD=1 rebuilds)"
else
  echo "== building and installing gnflex (CUDA_HOME=${CUDA_HOME:-none}, GNFLEX_CUDA=${GNFLEX_CUDA:-auto})"
  "$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$REPO"
fi
# From / so that the installed package is imported, not the source tree.
# (A sanitizer build can only be imported with its runtime preloaded: .ci/sanitize checks it.)
if [ -z "${GNFLEX_SANITIZE:-}" ]; then
  (cd / && "$PY" -c "import gnflex, torch; print('gnflex', gnflex.__version__, 'on torch', torch.__version__, '| CUDA kernels:', gnflex.built_with_cuda())")
fi
