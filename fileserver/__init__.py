"""aiohttp sidecar: package downloads, the SagooIoT-style device HTTP API, the admin API."""
