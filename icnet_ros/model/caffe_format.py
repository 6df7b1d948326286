"""Reading Caffe's two file formats without Caffe: binary .caffemodel weights and text .prototxt nets.

A .caffemodel is a serialized protobuf NetParameter. We read the protobuf wire format ourselves
(no compiled caffe_pb2, no protobuf dependency) and keep only what a weight import needs:

    NetParameter       layer = 100 (LayerParameter)      layers = 2 (V1LayerParameter, legacy)
    LayerParameter     name = 1, type = 2 (string), bottom = 3, top = 4, blobs = 7
    V1LayerParameter   bottom = 2, top = 3, name = 4, type = 5 (enum), blobs = 6
    BlobProto          shape = 7 (BlobShape: dim = 1, int64), data = 5 (float), double_data = 8,
                       legacy 4-D shape num = 1, channels = 2, height = 3, width = 4

Repeated numbers may be packed or not; unknown fields are skipped. Float arrays are decoded with
numpy in one call (the released ICNet files are 31 MB).

A .prototxt is protobuf text format; parse_prototxt turns it into nested {key: [values]} dicts.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

NET_LAYER, NET_LAYERS_V1 = 100, 2
LAYER_NAME, LAYER_TYPE, LAYER_BOTTOM, LAYER_TOP, LAYER_BLOBS = 1, 2, 3, 4, 7
V1_BOTTOM, V1_TOP, V1_NAME, V1_TYPE, V1_BLOBS = 2, 3, 4, 5, 6
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH, BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 1, 2, 3, 4, 5, 7, 8
SHAPE_DIM = 1

# V1LayerParameter.LayerType values of the layers a weight file is likely to hold (caffe.proto).
V1_LAYER_TYPES = {4: "Convolution", 14: "InnerProduct", 17: "Pooling", 18: "ReLU", 20: "Softmax",
                  5: "Data", 6: "Dropout", 15: "LRN", 25: "Eltwise", 3: "Concat", 39: "Deconvolution"}


class CaffeImportError(ValueError):
    """A Caffe file that cannot be read, or whose weights do not fit the network we build."""


@dataclass(frozen=True)
class CaffeLayer:
    """One layer of a .caffemodel: its name, type, connections and weight blobs (float32 arrays)."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    blobs: tuple[np.ndarray, ...]


class _WireError(Exception):
    """Internal: the bytes stop or go wrong at `position`; turned into a CaffeImportError naming the file."""

    def __init__(self, what: str, position: int):
        super().__init__(what)
        self.what, self.position = what, position


# --- protobuf wire format ------------------------------------------------------------------------
def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _WireError("the data ends inside a number", pos)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("a number is longer than 10 bytes", pos)


def _fields(data: bytes, start: int, end: int):
    """Yield (field number, wire type, value) of one message; value is an int (varint) or a
    (start, end) byte span of the field's payload (everything else)."""
    pos = start
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _WireError("field number 0 is not valid protobuf", tag_at)
        if wire == VARINT:
            value, pos = _read_varint(data, pos, end)
            yield field, wire, value
            continue
        if wire == LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos, end)
        elif wire in (FIXED64, FIXED32):
            length = 8 if wire == FIXED64 else 4
        else:
            raise _WireError(f"wire type {wire} (field {field}) is not used by Caffe files", tag_at)
        if pos + length > end:
            raise _WireError(f"field {field} needs {length} bytes but only {end - pos} remain", pos)
        yield field, wire, (pos, pos + length)
        pos += length


def _packed_varints(data: bytes, span: tuple[int, int]) -> list[int]:
    values, pos = [], span[0]
    while pos < span[1]:
        value, pos = _read_varint(data, pos, span[1])
        values.append(value)
    return values


def _numbers(data: bytes, wire: int, value, dtype: str) -> np.ndarray:
    """A packed (length-delimited) or single (fixed-width) run of little-endian floats or doubles."""
    start, end = value
    width = np.dtype(dtype).itemsize
    if wire == LENGTH_DELIMITED and (end - start) % width:
        raise _WireError(f"a packed array of {end - start} bytes is not a whole number of {width}-byte values",
                         start)
    return np.frombuffer(data, dtype=dtype, count=(end - start) // width, offset=start)


# --- .caffemodel -----------------------------------------------------------------------------------
def read_caffemodel(path: str | Path) -> tuple[list[CaffeLayer], bytes]:
    """(layers in file order, the file's bytes). Raises CaffeImportError for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise CaffeImportError(f"{path} does not exist (expected a .caffemodel weight file)")
    data = path.read_bytes()
    try:
        return _parse_net(data), data
    except _WireError as error:
        raise CaffeImportError(f"truncated or not a caffemodel: {path} ({len(data)} bytes): {error.what} "
                               f"at byte {error.position}") from None


def _parse_net(data: bytes) -> list[CaffeLayer]:
    layers = []
    for field, wire, value in _fields(data, 0, len(data)):
        if field == NET_LAYER and wire == LENGTH_DELIMITED:
            layers.append(_parse_layer(data, value))
        elif field == NET_LAYERS_V1 and wire == LENGTH_DELIMITED:
            layers.append(_parse_v1_layer(data, value))
    return layers


def _parse_layer(data: bytes, span) -> CaffeLayer:
    fields = {"name": "", "type": "", "bottoms": [], "tops": [], "blobs": []}
    for field, wire, value in _fields(data, *span):
        if wire != LENGTH_DELIMITED:
            continue
        if field == LAYER_NAME:
            fields["name"] = _text(data, value)
        elif field == LAYER_TYPE:
            fields["type"] = _text(data, value)
        elif field == LAYER_BOTTOM:
            fields["bottoms"].append(_text(data, value))
        elif field == LAYER_TOP:
            fields["tops"].append(_text(data, value))
        elif field == LAYER_BLOBS:
            fields["blobs"].append(_parse_blob(data, value))
    return _layer(fields)


def _parse_v1_layer(data: bytes, span) -> CaffeLayer:
    fields = {"name": "", "type": "", "bottoms": [], "tops": [], "blobs": []}
    for field, wire, value in _fields(data, *span):
        if field == V1_TYPE and wire == VARINT:
            fields["type"] = V1_LAYER_TYPES.get(value, f"V1 layer type {value}")
        elif wire != LENGTH_DELIMITED:
            continue
        elif field == V1_NAME:
            fields["name"] = _text(data, value)
        elif field == V1_BOTTOM:
            fields["bottoms"].append(_text(data, value))
        elif field == V1_TOP:
            fields["tops"].append(_text(data, value))
        elif field == V1_BLOBS:
            fields["blobs"].append(_parse_blob(data, value))
    return _layer(fields)


def _layer(fields: dict) -> CaffeLayer:
    return CaffeLayer(fields["name"], fields["type"], tuple(fields["bottoms"]), tuple(fields["tops"]),
                      tuple(fields["blobs"]))


def _text(data: bytes, span) -> str:
    return data[span[0]:span[1]].decode("utf-8", errors="replace")


def _parse_blob(data: bytes, span) -> np.ndarray:
    shape, legacy_shape, floats, doubles = None, {}, [], []
    for field, wire, value in _fields(data, *span):
        if field == BLOB_SHAPE and wire == LENGTH_DELIMITED:
            shape = _parse_shape(data, value)
        elif field in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH) and wire == VARINT:
            legacy_shape[field] = value
        elif field == BLOB_DATA and wire in (LENGTH_DELIMITED, FIXED32):
            floats.append(_numbers(data, wire, value, "<f4"))
        elif field == BLOB_DOUBLE_DATA and wire in (LENGTH_DELIMITED, FIXED64):
            doubles.append(_numbers(data, wire, value, "<f8"))
    values = np.concatenate(floats or doubles or [np.zeros(0, np.float32)]).astype(np.float32)  # a copy
    if shape is None and legacy_shape:  # blobs written before BlobShape existed: num, channels, height, width
        shape = tuple(legacy_shape.get(f, 1) for f in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH))
    elif shape is None:
        shape = (values.size,)
    if math.prod(shape) != values.size:  # Python ints: a corrupt dim may not fit in int64
        raise _WireError(f"a blob of shape {tuple(shape)} holds {values.size} values", span[0])
    return values.reshape(shape)


def _parse_shape(data: bytes, span) -> tuple[int, ...]:
    dims = []
    for field, wire, value in _fields(data, *span):
        if field == SHAPE_DIM and wire == VARINT:
            dims.append(value)
        elif field == SHAPE_DIM and wire == LENGTH_DELIMITED:
            dims.extend(_packed_varints(data, value))
    return tuple(dims)


# --- .prototxt (protobuf text format) --------------------------------------------------------------
_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}:;,\[\]<>]|[^\s{}:;,"\'#\[\]<>]+')


def parse_prototxt(path: str | Path) -> dict[str, list]:
    """A prototxt as nested dicts {field: [values]}; scalars are int, float or str (enums stay str)."""
    path = Path(path)
    if not path.is_file():
        raise CaffeImportError(f"prototxt {path} does not exist")
    tokens = _tokenize(path.read_text(errors="replace"), path)
    message, pos = _parse_message(tokens, 0, path)
    if pos != len(tokens):
        raise CaffeImportError(f"prototxt {path}, line {tokens[pos][1]}: unexpected {tokens[pos][0]!r}")
    return message


def _tokenize(text: str, path: Path) -> list[tuple[str, int]]:
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # an unterminated string
            raise CaffeImportError(f"prototxt {path}, line {line}: cannot read {text[pos:pos + 20]!r}")
        token = match.group()
        if not token[0].isspace() and token[0] != "#":
            tokens.append((token, line))
        line += token.count("\n")
        pos = match.end()
    return tokens


def _parse_message(tokens, pos: int, path: Path) -> tuple[dict[str, list], int]:
    message: dict[str, list] = {}
    while pos < len(tokens) and tokens[pos][0] not in ("}", ">"):
        key, line = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos][0] == ":":
            pos += 1
        if pos >= len(tokens):
            raise CaffeImportError(f"prototxt {path}, line {line}: {key!r} has no value")
        if tokens[pos][0] in ("{", "<"):
            value, pos = _parse_message(tokens, pos + 1, path)
            if pos >= len(tokens):
                raise CaffeImportError(f"prototxt {path}, line {line}: {key!r} block is not closed")
        else:
            value = _scalar(tokens[pos][0])
        message.setdefault(key, []).append(value)
        pos += 1
        if pos < len(tokens) and tokens[pos][0] in (";", ","):
            pos += 1
    return message, pos


def _scalar(token: str):
    if token[0] in "\"'":
        return token[1:-1]
    for kind in (int, float):
        try:
            return kind(token)
        except ValueError:
            pass
    return token
