"""The device contract: topics, payload codecs, credentials, and the upgrade description devices get."""
