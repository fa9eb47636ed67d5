# Sourced by the scripts: install if needed, then run offline with quiet telemetry.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
