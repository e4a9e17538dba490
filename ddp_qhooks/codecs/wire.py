"""The payload wire format: one contiguous uint8 tensor per rank per bucket.

::

    offset  size  field
    0       1     format version (WIRE_VERSION)
    1       1     codec id (see codecs.CODECS)
    2       1     bits per value
    3       1     flags: bit 0 = the input was non-finite (NaN/Inf); the body is then meaningless
    4       4     config fingerprint (crc32 of the codec configuration, little-endian)
    8       8     numel of the bucket (int64, little-endian)
    16      ...   codec body (block metadata, then packed codes; see the codec module)
    ...     0-3   zero padding to a multiple of 4 bytes, so every rank's payload in the gathered
                  buffer starts 4-byte aligned (float metadata is read in place)

The header lets every rank check what it received (version, codec, bits, size) and carries the
non-finite flag so that all ranks produce a non-finite result together.
"""
from __future__ import annotations

import json
import zlib

import torch

HEADER_BYTES = 16
WIRE_VERSION = 2  # 2: planar stripes for 1, 2 and 4 bits (packing.py)
FLAG_NONFINITE = 1


def payload_nbytes(body_nbytes: int) -> int:
    return (HEADER_BYTES + body_nbytes + 3) // 4 * 4


def fingerprint(config: dict) -> int:
    return zlib.crc32(json.dumps(config, sort_keys=True, default=str).encode())


def header_bytes(codec_id: int, bits: int, config_print: int, numel: int) -> torch.Tensor:
    raw = bytes([WIRE_VERSION, codec_id, bits, 0]) + config_print.to_bytes(4, "little") + numel.to_bytes(8, "little")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def parse_header(raw: bytes) -> dict:
    return {
        "version": raw[0], "codec_id": raw[1], "bits": raw[2], "flags": raw[3],
        "fingerprint": int.from_bytes(raw[4:8], "little"), "numel": int.from_bytes(raw[8:16], "little"),
    }
