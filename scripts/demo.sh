#!/usr/bin/env bash
# One command from nothing to segments: set up, generate a sample clickstream, run the pipeline,
# print where the Delta tables are and a short summary.
#   USERS=20000 scripts/demo.sh     (default 5000 users)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
USERS=${USERS:-5000}
.venv/bin/segspark generate --out sample --overwrite --users "$USERS" --days 90 --seed 42 \
  --duplicates 0.002 --missing-prices 0.001
.venv/bin/segspark run --config conf/local.yaml --run-id demo --set input.path=sample/events output.root=out/local

echo
echo "Delta tables are under $(pwd)/out/local/ (quarantine, user_features, user_segments, user_embeddings,"
echo "model_selection, segment_profiles, segment_transitions, runs); the model bundle is out/local/_models/demo."
echo "Score new data with this run's models (no retraining):"
echo "  .venv/bin/segspark score --config conf/local.yaml --bundle out/local/_models/demo --set input.path=sample/events"
echo "Read one back:  .venv/bin/python -c \"import deltalake; print(deltalake.DeltaTable('out/local/user_segments').to_pandas().head())\""
