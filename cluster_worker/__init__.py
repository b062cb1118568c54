"""The OTA server as a worker on a RabbitMQ cluster (docs/cluster.md): no broker of its own;
device messages come from queues it declares, pushes go out through `amq.topic`, and devices
log in through its HTTP auth endpoints. It translates AMQP for the engine, as broker_plugin/
translates amqtt."""
