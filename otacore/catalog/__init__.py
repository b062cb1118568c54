"""The catalog (ota.yaml): its model and validation, loading with files prepared, what a reload may change, rollout policies and versions."""
