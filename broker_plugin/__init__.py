"""amqtt plugins for the OTA server: device auth, topic ACL, and the OTA plugin that runs the engine."""
