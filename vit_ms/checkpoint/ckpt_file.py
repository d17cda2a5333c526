"""MindSpore's `.ckpt` file read straight from a memory map: each tensor copied out once, no protobuf objects.

`ms.load_checkpoint` parses the whole file with protobuf's pure-Python decoder (importing MindSpore sets
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python), builds a Parameter for every tensor, and `readers` then copied
each out again: 0.64-0.69 s for ViT-B/16's 346 MB on the AMD EPYC (Zen 4), against 0.09-0.15 s for this reader
(README, round 32). The format is small; MindSpore's `checkpoint.proto` (compiled into
`mindspore/train/checkpoint_pb2.py`) reads, in proto2:

    message Checkpoint { repeated Value value = 1; }
    message Value { required string tag = 1; oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

`ms.save_checkpoint` appends one serialized `Checkpoint` holding one `Value` per tensor (a tensor of more than
512 MB as several `Value`s of the same tag in a row, which the reader joins), a string of `append_dict` as a
`"str"` tensor of UTF-32 code units, and with `crc_check=True` a 17-byte trailer (`b"crc_num"` + 10 bytes)
that loading without `crc_check` skips (`mindspore/train/serialization.py`, `_exec_save` and
`_parse_ckpt_proto`). This module reads exactly that and nothing else: a map tensor, an encrypted file, a
dtype NumPy lacks (bfloat16, int4), a field or wire type it does not know, a length that runs past the end,
a tensor whose bytes do not fill its dims: `read_ckpt` returns None and the caller reads the file with
MindSpore, which then decides what it holds and words any error, as before. The file stays mapped only while
its tensors are copied out (~0.1 s for 346 MB); another process truncating it in that window would end this
one with SIGBUS, as with any memory-mapped reader (safetensors, `torch.load(mmap=True)`).
"""
from __future__ import annotations

import math
import mmap
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

# MindSpore's tensor_type strings (serialization.py's `_tensor_to_np_type`), the ones NumPy has.
DTYPES = {"Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
          "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16,
          "Float32": np.float32, "Float64": np.float64, "Bool": np.bool_}
STRING = "str"
CRC_TRAILER = b"crc_num"  # then 10 bytes of CRC-32, big-endian

# Protobuf wire types (protobuf.dev/programming-guides/encoding): VARINT carries dims one by one (proto2 does
# not pack repeated fields unless told), LEN carries strings, bytes, messages and packed dims.
VARINT, LEN = 0, 2


class NotPlain(Exception):
    """The file is not a plain checkpoint this module reads; MindSpore's own reader should."""


def read_ckpt(path, tensors: bool = True) -> Optional[Dict[str, Union[np.ndarray, str]]]:
    """{tag: array or str} of a `.ckpt`, in file order, as `ms.load_checkpoint` gives them; or None.

    None means "not a plain checkpoint this reader knows" (see the module docstring): read it with
    `ms.load_checkpoint`, which either reads it or raises. Every array is a fresh, aligned, writable copy,
    independent of the file.

    Args:
        path: the `.ckpt` file.
        tensors: False to return only the string entries (metadata) and skip copying any tensor.
    """
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file, or a file system that cannot map files
            return None
    try:
        return _read(data, tensors)
    except NotPlain:
        return None
    finally:
        try:
            data.close()
        except BufferError:  # an array still viewing the map (only while an error unwinds): the GC closes it
            pass


def _read(data: mmap.mmap, tensors: bool) -> Dict[str, Union[np.ndarray, str]]:
    end = len(data)
    if end >= 17 and data[end - 17:end - 10] == CRC_TRAILER:
        end -= 17
    entries: List[Tuple[str, List[int], str, List[Tuple[int, int]]]] = []  # tag, dims, type, content spans
    for number, wire, start, stop in _fields(data, 0, end):
        if (number, wire) != (1, LEN):
            raise NotPlain
        tag, dims, dtype, span = _value(data, start, stop)
        if entries and entries[-1][0] == tag:  # a large tensor, written in slices
            if (entries[-1][1], entries[-1][2]) != (dims, dtype):
                raise NotPlain
            entries[-1][3].append(span)
        else:
            entries.append((tag, dims, dtype, [span]))
    out: Dict[str, Union[np.ndarray, str]] = {}
    for tag, dims, dtype, spans in entries:
        if dtype == STRING:
            out[tag] = _string(data, spans)
        elif tensors:
            out[tag] = _tensor(data, dims, dtype, spans)
    return out


def _value(data, start: int, stop: int):
    """(tag, dims, tensor_type, content span) of one `Value`."""
    found = {}
    for number, wire, a, b in _fields(data, start, stop):
        if (number, wire) not in ((1, LEN), (2, LEN)) or number in found:
            raise NotPlain  # a map tensor (field 3), an unknown or repeated field
        found[number] = (a, b)
    if set(found) != {1, 2}:
        raise NotPlain
    tag = _text(data, *found[1])
    dims, dtype, span = [], None, None
    for number, wire, a, b in _fields(data, *found[2]):
        if number == 1 and wire == VARINT:
            dims.append(a)
        elif number == 1 and wire == LEN:  # packed dims: parsers must accept them either way
            position = a
            while position < b:
                dim, position = _varint(data, position)
                dims.append(dim)
            if position != b:
                raise NotPlain
        elif number == 2 and wire == LEN and dtype is None:
            dtype = _text(data, a, b)
        elif number == 3 and wire == LEN and span is None:
            span = (a, b)
        else:
            raise NotPlain
    if dtype is None or span is None or (dtype != STRING and dtype not in DTYPES):
        raise NotPlain
    if any(dim >= 1 << 63 for dim in dims):  # a negative int64
        raise NotPlain
    return tag, ([] if dims == [0] else dims), dtype, span  # MindSpore writes a scalar's dims as [0]


def _tensor(data, dims: List[int], dtype: str, spans) -> np.ndarray:
    """The tensor's bytes copied out of the map (a fresh uint8 buffer, so aligned) and viewed as its dtype."""
    dtype = np.dtype(DTYPES[dtype])
    size = sum(b - a for a, b in spans)
    if size != math.prod(dims) * dtype.itemsize:
        raise NotPlain
    if len(spans) == 1:
        a, b = spans[0]
        raw = np.frombuffer(data, np.uint8, b - a, a).copy()
    else:
        raw = np.concatenate([np.frombuffer(data, np.uint8, b - a, a) for a, b in spans])
    return raw.view(dtype).reshape(dims)


def _string(data, spans) -> str:
    """A string entry as MindSpore decodes it: UTF-32 code units, trailing NULs dropped."""
    raw = b"".join(data[a:b] for a, b in spans)
    last = spans[-1][1] - spans[-1][0]
    if not last or last % 4 or len(raw) % last:
        raise NotPlain
    try:
        return str(np.frombuffer(raw, f"U{last // 4}")[0])
    except (ValueError, UnicodeDecodeError) as error:
        raise NotPlain from error


def _text(data, a: int, b: int) -> str:
    try:
        return data[a:b].decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotPlain from error


def _fields(data, position: int, stop: int):
    """(field number, wire type, start, stop) of each field in data[position:stop]; a varint's value as start."""
    while position < stop:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, position = _varint(data, position)
            if position > stop:
                raise NotPlain
            yield number, wire, value, None
        elif wire == LEN:
            length, position = _varint(data, position)
            if position + length > stop:
                raise NotPlain  # truncated, or a damaged length
            yield number, wire, position, position + length
            position += length
        else:
            raise NotPlain
    if position != stop:
        raise NotPlain


def _varint(data, position: int) -> Tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if position >= len(data):
            raise NotPlain
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise NotPlain


__all__ = ["DTYPES", "NotPlain", "read_ckpt"]
