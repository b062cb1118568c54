"""Package files on disk (hashes, diffs), signed URLs, MQTT blocks and the bytes served per job."""
