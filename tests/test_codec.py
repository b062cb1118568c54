"""otacore/protocol/codec.py: CRC, the binary block reply, and parsing of device payloads."""
from __future__ import annotations

import json
import struct

import pytest

from otacore.protocol.codec import (MAX_BLOCK_HEADER, MAX_JSON_BYTES, PayloadError, crc16_arc, decode_block_reply,
                           decode_json, encode_block_reply, parse_block_request, parse_firmware_request,
                           parse_progress, parse_version_report)


def payload(value) -> bytes:
    return json.dumps(value).encode()


# --- CRC and block replies ----------------------------------------------------------------

def test_crc16_arc_check_vector():
    assert crc16_arc(b"123456789") == 0xBB3D


def test_crc16_arc_of_nothing_is_zero():
    assert crc16_arc(b"") == 0


def test_block_reply_layout_and_round_trip():
    header = {"id": "7", "code": 200, "msg": "success",
              "data": {"fileToken": "t", "fileLength": 9, "bSize": 256, "bOffset": 0}}
    block = b"123456789"
    frame = encode_block_reply(header, block)
    (length,) = struct.unpack(">H", frame[:2])
    assert json.loads(frame[2:2 + length]) == header
    assert frame[2 + length:-2] == block
    assert frame[-2:] == struct.pack("<H", 0xBB3D)
    assert decode_block_reply(frame) == (header, block)


def test_error_block_reply_is_header_only():
    header = {"id": "7", "code": 404, "msg": "unknown stream"}
    frame = encode_block_reply(header, None)
    (length,) = struct.unpack(">H", frame[:2])
    assert len(frame) == 2 + length
    assert decode_block_reply(frame) == (header, None)


def test_block_reply_with_non_ascii_header_round_trips():
    header = {"id": "1", "code": 200, "msg": "成功"}
    assert decode_block_reply(encode_block_reply(header, b"\x00\xff" * 200)) == (header, b"\x00\xff" * 200)


def test_a_block_reply_header_is_at_most_1024_bytes_whatever_the_message():
    header = {"id": "\x01" * 64, "code": 400, "msg": "\x02" * 100_000}  # each escaped to 6 bytes
    frame = encode_block_reply(header, None)
    assert len(frame) - 2 == struct.unpack(">H", frame[:2])[0] <= MAX_BLOCK_HEADER
    decoded, _ = decode_block_reply(frame)
    assert decoded["id"] == header["id"] and header["msg"].startswith(decoded["msg"])


def test_decode_block_reply_rejects_a_bad_crc():
    frame = bytearray(encode_block_reply({"id": "1", "code": 200}, b"abcdef"))
    frame[-3] ^= 0x01  # flip a bit in the block
    with pytest.raises(PayloadError, match="CRC"):
        decode_block_reply(bytes(frame))


# --- JSON envelope --------------------------------------------------------------------------

@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (None, "empty"),
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe{}", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"text"', "JSON object"),
    (b"42", "JSON object"),
])
def test_decode_json_rejects(data, reason):
    with pytest.raises(PayloadError, match=reason):
        decode_json(data)


def test_decode_json_rejects_oversize_payload():
    data = payload({"id": "1", "params": {"desc": "x" * MAX_JSON_BYTES}})
    assert len(data) > 64 * 1024
    with pytest.raises(PayloadError, match="over"):
        decode_json(data)


def test_decode_json_accepts_exactly_the_limit():
    data = b'{"a":"' + b"x" * (MAX_JSON_BYTES - 8) + b'"}'
    assert len(data) == MAX_JSON_BYTES
    assert decode_json(data)["a"].startswith("x")


# --- version report -------------------------------------------------------------------------

def test_version_report_with_module():
    report = parse_version_report(decode_json(payload({"id": "123", "params": {"version": "1.0.1", "module": "MCU"}})))
    assert (report.id, report.version, report.module) == ("123", "1.0.1", "MCU")


def test_version_report_defaults_module_and_accepts_numbers():
    report = parse_version_report({"id": 123, "params": {"version": 2}})
    assert (report.id, report.version, report.module) == ("123", "2", "default")
    assert parse_version_report({"params": {"version": "1.0.0", "module": ""}}).module == "default"


@pytest.mark.parametrize("message", [
    {"id": "1"},
    {"id": "1", "params": {}},
    {"id": "1", "params": {"version": ""}},
    {"id": "1", "params": {"version": {"major": 1}}},
    {"id": "1", "params": "1.0.0"},
])
def test_version_report_rejects_missing_or_bad_version(message):
    with pytest.raises(PayloadError):
        parse_version_report(message)


# --- progress -------------------------------------------------------------------------------

@pytest.mark.parametrize("step, expected", [("45", 45), (45, 45), (1, 1), ("100", 100), (-1, -1), ("-4", -4),
                                            (45.0, 45)])
def test_progress_step_accepts_strings_and_numbers(step, expected):
    report = parse_progress({"id": "9", "params": {"step": step, "desc": "downloading", "module": "MCU"}})
    assert (report.id, report.step, report.desc, report.module) == ("9", expected, "downloading", "MCU")


def test_progress_defaults_module_and_desc():
    report = parse_progress({"id": "9", "params": {"step": "10"}})
    assert (report.module, report.desc) == ("default", "")


def test_progress_desc_is_cut_to_128_characters():
    report = parse_progress({"params": {"step": 50, "desc": "é" * 300}})
    assert report.desc == "é" * 128


@pytest.mark.parametrize("step", [101, -5, "-0x1", "abc", "", None, True, [45], "inf", "nan"])
def test_progress_rejects_out_of_range_or_non_numeric_step(step):
    with pytest.raises(PayloadError):
        parse_progress({"id": "9", "params": {"step": step}})


# --- firmware/get ---------------------------------------------------------------------------

def test_firmware_request_with_module():
    request = parse_firmware_request({"id": "123", "version": "1.0", "params": {"module": "MCU"},
                                      "method": "thing.ota.firmware.get"})
    assert (request.id, request.version, request.module) == ("123", "1.0", "MCU")


@pytest.mark.parametrize("params", [{}, None])
def test_firmware_request_with_empty_params_uses_default_module(params):
    request = parse_firmware_request({"id": 5, "version": 1.0, "params": params})
    assert (request.id, request.version, request.module) == ("5", "1.0", "default")


def test_firmware_request_without_params_or_version():
    request = parse_firmware_request({"id": "1"})
    assert (request.version, request.module) == ("", "default")


def test_firmware_request_rejects_non_object_params():
    with pytest.raises(PayloadError):
        parse_firmware_request({"id": "1", "params": ["MCU"]})


# --- file/download --------------------------------------------------------------------------

def block_message(size=4096, offset=8192, info=None, **extra):
    params = {"fileInfo": {"streamId": 1397345, "fileId": 1} if info is None else info,
              "fileBlock": {"size": size, "offset": offset}} | extra
    return {"id": "7", "version": "1.0", "params": params}


def test_block_request_parses_the_protocol_example():
    request = parse_block_request(block_message(fileToken="tok"))
    assert (request.id, request.stream_id, request.file_id, request.size, request.offset, request.file_token) == (
        "7", 1397345, 1, 4096, 8192, "tok")


def test_block_request_accepts_string_numbers_and_no_token():
    request = parse_block_request(block_message(size="256", offset="0", info={"streamId": "12"}))
    assert (request.stream_id, request.file_id, request.size, request.offset, request.file_token) == (
        12, 1, 256, 0, None)


def test_block_request_accepts_the_largest_block():
    assert parse_block_request(block_message(size=131072)).size == 131072


@pytest.mark.parametrize("size", [255, 131073, 0, -4096])
def test_block_request_rejects_size_outside_256_to_131072(size):
    with pytest.raises(PayloadError, match="256..131072"):
        parse_block_request(block_message(size=size))


def test_block_request_rejects_negative_offset():
    with pytest.raises(PayloadError, match="negative"):
        parse_block_request(block_message(offset=-1))


@pytest.mark.parametrize("message", [
    {"id": "7", "params": {"fileBlock": {"size": 4096, "offset": 0}}},
    {"id": "7", "params": {"fileInfo": {"streamId": 1}}},
    {"id": "7", "params": {"fileInfo": "1", "fileBlock": {"size": 4096, "offset": 0}}},
    {"id": "7"},
])
def test_block_request_rejects_missing_file_info_or_block(message):
    with pytest.raises(PayloadError, match="required"):
        parse_block_request(message)


@pytest.mark.parametrize("message", [
    block_message(info={"fileId": 1}),
    block_message(info={"streamId": "abc"}),
    block_message(size="big"),
    block_message(offset=True),
])
def test_block_request_rejects_non_integer_fields(message):
    with pytest.raises(PayloadError, match="integer"):
        parse_block_request(message)


@pytest.mark.parametrize("step", [0, "0"])
def test_progress_step_0_means_started(step):
    assert parse_progress({"id": 2, "params": {"step": step, "desc": ""}}).step == 0


# --- lenient JSON: trailing commas only ------------------------------------------------------

C_SDK_BLOCK_REQUEST = (b'{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":{"streamId":1,"fileId":1,},'
                       b'"fileBlock":{"size":10240,"offset":0}}}')


def test_the_c_link_sdk_block_request_with_its_trailing_comma_decodes():
    request = parse_block_request(decode_json(C_SDK_BLOCK_REQUEST))
    assert (request.id, request.stream_id, request.file_id, request.size, request.offset) == ("1", 1, 1, 10240, 0)


@pytest.mark.parametrize("payload, expected", [
    (b'{"a":{"b":true,},}', {"a": {"b": True}}),
    (b'{"a":[1, 2 ,\n],}', {"a": [1, 2]}),
    (b'{"a":"x,}","b":1,}', {"a": "x,}", "b": 1}),  # a comma inside a string is the string's
    (b'{"a":"\\\\",}', {"a": "\\"}),  # an escaped backslash ends right before the quote
])
def test_trailing_commas_are_forgiven(payload, expected):
    assert decode_json(payload) == expected


@pytest.mark.parametrize("garbage", [b'{,}', b'{"a":1,,}', b'{"a":,}', b'{"a":[,]}', b'{"a":1', b"{'a':1}",
                                     b'{"a":1} ,', b'{"a":01}', b'{"a":1,}}', b"\xff{}", b'{"a":NaN,}x'])
def test_anything_else_that_is_not_json_is_still_refused_with_the_reason(garbage):
    with pytest.raises(PayloadError, match="malformed JSON: "):
        decode_json(garbage)


def test_the_size_limit_holds_for_lenient_payloads_too():
    with pytest.raises(PayloadError, match="over"):
        decode_json(b'{"a":"' + b"x" * 70_000 + b'",}')


def test_a_lone_surrogate_escape_is_refused_and_real_characters_are_kept():
    """No database stores a lone surrogate (UTF-8 cannot carry one): a device writing one must
    not make every later write of the journal fail."""
    with pytest.raises(PayloadError, match="lone surrogate"):
        decode_json(b'{"params": {"version": "1.\\ud800"}}')
    assert decode_json(b'{"v": "\\u00e9\\ud83d\\ude00"}') == {"v": "\u00e9\U0001F600"}
