#!/usr/bin/env bash
# Refresh the README's pictures (docs/img/): the end-to-end browser test's screenshot of the Dagster
# UI and the contact sheet of the shard it shows, as that test's run materialized them.
set -euo pipefail
cd "$(dirname "$0")/.."
CURATOR_DOCS_PICTURES="$PWD/docs/img" .venv/bin/python -m pytest -q -p no:cacheprovider \
  curator_assets_tests/test_dagster_dev.py -k test_sensor_picks_up_shards_and_daemon_runs_them
