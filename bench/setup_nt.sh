#!/usr/bin/env bash
# Creates the optional neural-tangents environment .bench-env/ used only by the bench's nt rows.
# It is never a dependency of the service. Usage: bench/setup_nt.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
ENV_DIR=.bench-env
if [ -x "$ENV_DIR/bin/python" ] && "$ENV_DIR/bin/python" -c "import neural_tangents, jax" 2>/dev/null; then
  echo "nt env ready: $ENV_DIR"
  exit 0
fi
"$PYTHON" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install -q --upgrade pip
# jax 0.4.25 predates numpy 2; scikit-learn loads the digits data set in this env too.
"$ENV_DIR/bin/pip" install -q "neural-tangents==0.6.5" "jax==0.4.25" "jaxlib==0.4.25" "numpy<2" \
  "scipy<1.13" "scikit-learn<1.6"
"$ENV_DIR/bin/python" -c "import neural_tangents, jax; print('nt', neural_tangents.__version__, 'jax', jax.__version__)"
