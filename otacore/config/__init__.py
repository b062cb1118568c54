"""broker.yaml: reading it, the OTA plugin's settings, and YAML that remembers lines for error messages."""
