"""The engine's decisions by use case, as synchronous functions over the fleet in memory."""
