"""Scalar metrics to JSON lines and TensorBoard event files, without a TensorFlow dependency.

The event file format is TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C) of
``tensorflow.Event`` protocol buffers, written here by hand for the few fields scalars need:
``Event{wall_time=1, step=2, file_version=3, summary=5}``, ``Summary{value=1}``,
``Summary.Value{tag=1, simple_value=2}``. TensorBoard reads these files as usual.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

_CRC_TABLE: list[int] = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float, step: int, scalars: Mapping[str, float] | None = None, file_version: str = ""
) -> bytes:
    """A serialised ``tensorflow.Event`` with scalar summaries."""
    event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version:
        event += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items()
        )
        event += _field_bytes(5, values)
    return event


def frame_record(payload: bytes) -> bytes:
    """TFRecord framing of one record."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


class MetricWriter:
    """Writes scalars to ``<workdir>/metrics.jsonl`` and a TensorBoard event file in ``<workdir>/tb``.

    Only process 0 should write; other processes pass ``enabled=False``.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._events = None
        if enabled:
            (self.workdir / "tb").mkdir(parents=True, exist_ok=True)
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self._events = open(self.workdir / "tb" / name, "ab")  # noqa: SIM115
            self._events.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))

    def truncate_after(self, step: int) -> None:
        """Drop JSON lines of steps after ``step`` (left by a run that died after its last checkpoint)."""
        if not self.enabled or not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        tmp = self.jsonl_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.jsonl_path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in scalars.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._events.write(frame_record(encode_event(time.time(), int(step), values)))
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
