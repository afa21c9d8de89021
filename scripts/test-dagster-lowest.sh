#!/usr/bin/env bash
# The Dagster-facing tests on the lowest supported Dagster (1.12.x), in an environment of their own.
#
#   scripts/test-dagster-lowest.sh            # create/update .venv-dagster-lowest, then test
#   scripts/test-dagster-lowest.sh -k sensor  # extra arguments go to pytest
#
# The project is installed with its ordinary dependencies and one constraint, dagster<1.13, so pip
# picks the Dagster 1.12 release and the dagster-* libraries that match it (integration libraries
# 0.28.x), as a user with Dagster 1.12 would get. Then `dg check defs` / `dg list defs` and the test
# files that run Dagster (assets, checks, sensors, the instance, the daemon) run on it.
# Environment: PYTHON (default python3), CURATOR_LOWEST_VENV (default .venv-dagster-lowest).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CURATOR_LOWEST_VENV:-.venv-dagster-lowest}
LOWEST=1.12
TESTS=(
  curator_assets_tests/test_dagster_shards.py
  curator_assets_tests/test_decode_dagster.py
  curator_assets_tests/test_validation_dagster.py
  curator_assets_tests/test_dagster_metadata.py
  curator_assets_tests/test_instance_storage.py
  curator_assets_tests/test_dagster_own_instance.py
  curator_assets_tests/test_warm_launcher.py
  curator_assets_tests/test_executors.py
)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "dagster>=${LOWEST},<1.13" > "$constraints"

if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$constraints" -e '.[dev]'
"$VENV/bin/python" - "$LOWEST" <<'PY'
import sys
import dagster
assert dagster.__version__.startswith(sys.argv[1] + "."), f"dagster {dagster.__version__}, not {sys.argv[1]}.x"
print(f"dagster {dagster.__version__}")
PY

export PATH="$PWD/$VENV/bin:$PATH"
dg check defs
dg list defs > /dev/null
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
