"""The OTA server process without its MQTT side: what the embedded broker (broker_plugin/) and
the cluster worker (cluster_worker/) both run."""
