"""What Aliyun's C Link SDK 4.x (`ota` and `mqtt_download` components) sends, byte for byte:
block requests with a trailing comma and the hard-coded fileToken "default", and step "0" when
a download begins. tests/test_c_link_sdk.py replays it against the embedded server,
tests/test_cluster.py through a RabbitMQ cluster."""

# The first block request names stream 1: the first job of a fresh server.
FIRST_REQUEST = (b'{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":{"streamId":1,"fileId":1,},'
                 b'"fileBlock":{"size":10240,"offset":0}}}')
NEXT_REQUEST = ('{{"id":"{id}","version":"1.0","params":{{"fileToken":"default","fileInfo":{{"streamId":{stream},'
                '"fileId":1,}},"fileBlock":{{"size":10240,"offset":{offset}}}}}}}')
STARTED = b'{"id":2,"params":{"step":"0","desc":""}}'


def first_request(stream: int) -> bytes:
    """FIRST_REQUEST for another stream, every other byte kept."""
    return FIRST_REQUEST.replace(b'"streamId":1,', f'"streamId":{stream},'.encode())
