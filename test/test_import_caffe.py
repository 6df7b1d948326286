"""icnet-import: the authors' released Caffe weights -> our checkpoint, checked against Caffe's semantics.

No real caffemodel is needed (users download those). The tests WRITE synthetic ones in Caffe's wire
format, with their own protobuf encoder (independent of the reader), the released layer names,
types and shapes (every layer of evaluation/prototxt/icnet_cityscapes*.prototxt, ReLUs included),
seeded random weights and non-trivial BN statistics, in both released flavours. Our imported model
is then compared with a reference of the Caffe network written here from plain tensor operations:
F.conv2d on the blobs themselves, the Scale as a multiply, PSPNet's BN formula, and Caffe's Interp
and Pooling written out by hand (Interp size rules, corner-aligned bilinear, ceil-rule MAX pooling,
fixed-window AVE pooling). Nothing of our model code is used for the reference.

Training snapshots are written too: the same layers plus the training net's auxiliary classifiers
sub4_out (on conv5_4_interp) and sub24_out (on sub24_sum_interp), named and connected as in the ICNet
training net (hellochick/ICNet-tensorflow follows its names), and its blob-less data, label and loss layers.
"""
from __future__ import annotations

import hashlib
import logging
import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icnet_ros.model.caffe_import import CaffeImportError, import_caffemodel, main
from icnet_ros.model.checkpoint import load_model, read_checkpoint
from icnet_ros.model.icnet import check_branch
from icnet_ros.model.preprocess import image_to_input

CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # eval_all.m
INPUT_SCALE = (0.9, 1.1, 1.05)  # data_sub1's per-channel factors (B, G, R): anything but 1 tests the fold
BN_EPS = 1e-5  # PSPNet's BNParameter default
PYRAMID_BINS = (1, 2, 3, 6)

RELEASED_INPUT = (1025, 2049)
RELEASED_WINDOWS = ((33, 65, 33, 65), (17, 33, 16, 32), (13, 25, 10, 20), (8, 15, 5, 10))
# A small Caffe-valid input (32k+1): conv5_3 is 7x13, the smallest 32k+1 map on which Caffe's AVE
# pooling can give 6 bins (129x257 gives 5x9, and 5 rows cannot hold 6 unpadded windows). Windows
# chosen so that ceil((size - kernel) / stride) + 1 is each bin count, as the released ones are.
SMALL_INPUT = (193, 385)
SMALL_WINDOWS = ((7, 13, 7, 13), (4, 7, 3, 6), (3, 5, 2, 4), (2, 3, 1, 2))
# The 1x1 classifiers with a bias and no BN, in either flavour: the evaluation net's and the training net's.
CLASSIFIERS = ("conv6_cls", "sub4_out", "sub24_out")
AUX_OUTPUTS = {"sub4": "sub4_out", "sub24": "sub24_out"}  # our branch -> the training net's classifier


# --- a protobuf encoder (the wire format, written independently of the reader) ---------------------
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint(field_number << 3 | wire_type)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return tag(field_number, 2) + varint(len(payload)) + payload


def string(field_number: int, text: str) -> bytes:
    return length_delimited(field_number, text.encode())


def encode_blob(array: np.ndarray, legacy: bool = False) -> bytes:
    """BlobProto. Modern: BlobShape (packed dims) and packed float data. Legacy: num/channels/height/
    width, with small blobs as one unpacked float per field and the input scale as double_data."""
    array = np.asarray(array)
    if not legacy:
        dims = b"".join(varint(d) for d in array.shape)
        data = array.astype("<f4").tobytes()
        return length_delimited(7, length_delimited(1, dims)) + length_delimited(5, data)
    shape4 = (1,) * (4 - array.ndim) + array.shape
    out = b"".join(tag(number, 0) + varint(d) for number, d in zip((1, 2, 3, 4), shape4))
    if array.size <= 3:
        return out + length_delimited(8, array.astype("<f8").tobytes())
    if array.size <= 256:
        return out + b"".join(tag(5, 5) + struct.pack("<f", v) for v in array.reshape(-1))
    return out + length_delimited(5, array.astype("<f4").tobytes())


def encode_layer(layer: Layer, blobs, legacy: bool = False) -> bytes:
    out = string(1, layer.name) + string(2, layer.type)
    out += b"".join(string(3, b) for b in layer.bottoms) + b"".join(string(4, t) for t in layer.tops)
    return out + b"".join(length_delimited(7, encode_blob(b, legacy)) for b in blobs)


def encode_caffemodel(layers, blobs, legacy: bool = False) -> bytes:
    net = string(1, "ICNet synthetic")
    return net + b"".join(length_delimited(100, encode_layer(layer, blobs.get(layer.name, ()), legacy))
                          for layer in layers)


def encode_v1_net(layers: list[tuple[str, int, list[np.ndarray]]]) -> bytes:
    """A legacy (V1LayerParameter) net, blob dims unpacked: name = 4, type enum = 5, blobs = 6."""
    def blob(array):
        dims = b"".join(tag(1, 0) + varint(d) for d in array.shape)
        return length_delimited(7, dims) + length_delimited(5, array.astype("<f4").tobytes())

    return b"".join(length_delimited(2, string(4, name) + tag(5, 0) + varint(kind)
                                     + b"".join(length_delimited(6, blob(b)) for b in arrays))
                    for name, kind, arrays in layers)


# --- the released network, layer by layer ----------------------------------------------------------
@dataclass
class Layer:
    name: str
    type: str
    bottoms: tuple
    tops: tuple
    params: dict = field(default_factory=dict)


class ReleasedNet:
    """evaluation/prototxt/icnet_cityscapes_bnnomerge.prototxt, with widths scaled by keep_rate / 0.5."""

    def __init__(self, keep_rate: float, num_classes: int, input_size, windows):
        self.factor, self.layers, self.num_classes = keep_rate / 0.5, [], num_classes
        self.build(num_classes, input_size, windows)

    def add(self, name, layer_type, bottoms, top=None, **params):
        self.layers.append(Layer(name, layer_type, tuple(bottoms), (top or name,), params))
        return top or name

    def conv(self, name, bottom, outputs, kernel, stride=1, pad=0, dilation=1, relu=True, scaled=True):
        outputs = round(outputs * self.factor) if scaled else outputs
        self.add(name, "Convolution", [bottom], num_output=outputs, kernel_size=kernel, stride=stride, pad=pad,
                 dilation=dilation)
        if scaled:  # every conv but conv6_cls has a BN in the bnnomerge net
            self.add(name + "/bn", "BN", [name], name, frozen="true", momentum=0.95)
        if relu:
            self.add(name + "/relu", "ReLU", [name], name)
        return name

    def bottleneck(self, prefix, bottom, reduce, out, stride=1, dilation=1, projection=False):
        x = self.conv(f"{prefix}_1x1_reduce", bottom, reduce, 1, stride)
        x = self.conv(f"{prefix}_3x3", x, reduce, 3, 1, dilation, dilation)
        x = self.conv(f"{prefix}_1x1_increase", x, out, 1, relu=False)
        shortcut = self.conv(f"{prefix}_1x1_proj", bottom, out, 1, stride, relu=False) if projection else bottom
        self.add(prefix, "Eltwise", [shortcut, x], operation="SUM")
        self.add(prefix + "/relu", "ReLU", [prefix], prefix)
        return prefix

    def build(self, num_classes, input_size, windows):
        self.add("data_sub1", "Scale", ["data"])
        self.add("data_sub2", "Interp", ["data_sub1"], shrink_factor=2)
        x = self.conv("conv1_1_3x3_s2", "data_sub2", 32, 3, 2, 1)
        x = self.conv("conv1_2_3x3", x, 32, 3, 1, 1)
        x = self.conv("conv1_3_3x3", x, 64, 3, 1, 1)
        x = self.add("pool1_3x3_s2", "Pooling", [x], kernel_size=3, stride=2, pad=1, pool="MAX")
        for i in (1, 2, 3):
            x = self.bottleneck(f"conv2_{i}", x, 32, 128, projection=i == 1)
        self.bottleneck("conv3_1", x, 64, 256, stride=2, projection=True)
        x = self.add("conv3_1_sub4", "Interp", ["conv3_1"], shrink_factor=2)
        for i in (2, 3, 4):
            x = self.bottleneck(f"conv3_{i}", x, 64, 256)
        for i in range(1, 7):
            x = self.bottleneck(f"conv4_{i}", x, 128, 512, dilation=2, projection=i == 1)
        for i in (1, 2, 3):
            x = self.bottleneck(f"conv5_{i}", x, 256, 1024, dilation=4, projection=i == 1)
        self.pyramid(input_size, windows)
        self.cascade(num_classes)

    def pyramid(self, input_size, windows):
        size = [(side - 1) // 32 + 1 for side in input_size]
        for bins, (kernel_h, kernel_w, stride_h, stride_w) in zip(PYRAMID_BINS, windows):
            self.add(f"conv5_3_pool{bins}", "Pooling", ["conv5_3"], kernel_h=kernel_h, kernel_w=kernel_w,
                     stride_h=stride_h, stride_w=stride_w, pool="AVE")
            self.add(f"conv5_3_pool{bins}_interp", "Interp", [f"conv5_3_pool{bins}"], height=size[0],
                     width=size[1])
        self.add("conv5_3_sum", "Eltwise", ["conv5_3"] + [f"conv5_3_pool{b}_interp" for b in (6, 3, 2, 1)])

    def cascade(self, num_classes):
        x = self.conv("conv5_4_k1", "conv5_3_sum", 256, 1)
        x = self.add("conv5_4_interp", "Interp", [x], zoom_factor=2)
        self.conv("conv_sub4", x, 128, 3, 1, 2, 2, relu=False)
        self.conv("conv3_1_sub2_proj", "conv3_1", 128, 1, relu=False)
        self.add("sub24_sum", "Eltwise", ["conv3_1_sub2_proj", "conv_sub4"])
        self.add("sub24_sum/relu", "ReLU", ["sub24_sum"], "sub24_sum")
        x = self.add("sub24_sum_interp", "Interp", ["sub24_sum"], zoom_factor=2)
        self.conv("conv_sub2", x, 128, 3, 1, 2, 2, relu=False)
        x = self.conv("conv1_sub1", "data_sub1", 32, 3, 2, 1)
        x = self.conv("conv2_sub1", x, 32, 3, 2, 1)
        x = self.conv("conv3_sub1", x, 64, 3, 2, 1)
        self.conv("conv3_sub1_proj", x, 128, 1, relu=False)
        self.add("sub12_sum", "Eltwise", ["conv3_sub1_proj", "conv_sub2"])
        self.add("sub12_sum/relu", "ReLU", ["sub12_sum"], "sub12_sum")
        x = self.add("sub12_sum_interp", "Interp", ["sub12_sum"], zoom_factor=2)
        x = self.conv("conv6_cls", x, num_classes, 1, relu=False, scaled=False)
        self.add("conv6_interp", "Interp", [x], zoom_factor=4)

    def flavour_layers(self, flavour: str) -> list[Layer]:
        """The BN-merged net (icnet_cityscapes.prototxt) is the same without its BN layers."""
        return [layer for layer in self.layers if flavour == "bn_kept" or layer.type != "BN"]

    def aux_classifiers(self, bottoms=("conv5_4_interp", "sub24_sum_interp")) -> list[Layer]:
        """The training net's cascade label guidance classifiers: 1x1 convs with a bias on the zoomed
        conv5_4 features (H/16) and the zoomed sub24 fusion (H/8)."""
        params = {"num_output": self.num_classes, "kernel_size": 1, "stride": 1, "pad": 0, "dilation": 1}
        return [Layer(name, "Convolution", (bottom,), (name,), dict(params))
                for name, bottom in zip(("sub4_out", "sub24_out"), bottoms)]


def training_only_layers() -> list[Layer]:
    """What else a training net holds, none with weights: the data layer, the labels shrunk to each
    branch's size by Interp layers, and the three losses."""
    layers = [Layer("data", "ImageSegData", (), ("data", "label"))]
    branches = (("sub4", "sub4_out", 16), ("sub24", "sub24_out", 8), ("sub124", "conv6_cls", 4))
    for branch, logits, shrink in branches:
        label, loss = f"label_{branch}", f"loss_{branch}"
        layers.append(Layer(label, "Interp", ("label",), (label,), {"shrink_factor": shrink}))
        layers.append(Layer(loss, "SoftmaxWithLoss", (logits, label), (loss,)))
    return layers


def synthetic_blobs(layers: list[Layer], flavour: str, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Seeded weights in Caffe's layouts. Gains keep activations O(1) so that logits are O(1..10)."""
    rng = np.random.default_rng(seed)
    blobs = {"data_sub1": [np.asarray(INPUT_SCALE, np.float32)]}
    channels = {"data": 3}
    for layer in layers:
        if layer.type == "Convolution":
            blobs[layer.name] = conv_blobs(rng, layer, channels[layer.bottoms[0]], flavour)
        elif layer.type == "BN":
            width = channels[layer.bottoms[0]]
            blobs[layer.name] = [v.reshape(1, width, 1, 1).astype(np.float32) for v in (
                rng.uniform(0.5, 1.5, width), rng.normal(0, 0.2, width), rng.normal(0, 0.2, width),
                rng.uniform(0.5, 2.0, width))]
        channels[layer.tops[0]] = layer.params.get("num_output", channels.get(layer.bottoms[0], 3))
    return blobs


# Weight gains that do what trained BN statistics would: 16 residual sums ("increase"), the pyramid's
# sum of five maps ("k1") and the classifier's positive inputs ("cls") would otherwise grow the logits.
DAMPING = {"increase": 0.4, "k1": 0.25, "cls": 0.1, "out": 0.1}


def conv_blobs(rng, layer: Layer, in_channels: int, flavour: str) -> list[np.ndarray]:
    kernel, outputs = layer.params["kernel_size"], layer.params["num_output"]
    gain = math.sqrt(2.0 / (in_channels * kernel * kernel)) * DAMPING.get(layer.name.rsplit("_", 1)[-1], 1.0)
    if layer.bottoms[0] in ("data_sub1", "data_sub2"):
        gain /= 60.0  # the input is mean-subtracted pixels, about +-100
    weight = rng.normal(0, gain, (outputs, in_channels, kernel, kernel)).astype(np.float32)
    if flavour == "bn_merged" or layer.name in CLASSIFIERS:
        return [weight, rng.normal(0, 0.2, outputs).astype(np.float32)]
    return [weight]


PARAM_BLOCKS = {"Convolution": "convolution_param", "Pooling": "pooling_param", "Interp": "interp_param",
                "Eltwise": "eltwise_param", "BN": "bn_param"}


def prototxt_text(layers: list[Layer], input_size, flavour: str, bn_eps: float | None = None) -> str:
    lines = ['name: "ICNet synthetic"', 'input: "data"'] + [f"input_dim: {d}" for d in (1, 3, *input_size)]
    for layer in layers:
        params = dict(layer.params)
        if layer.type == "Convolution" and flavour == "bn_kept" and layer.name not in CLASSIFIERS:
            params["bias_term"] = "false"
        if layer.type == "BN" and bn_eps is not None:
            params["eps"] = bn_eps
        lines += ["layer {", f'  name: "{layer.name}"', f'  type: "{layer.type}"']
        lines += [f'  bottom: "{b}"' for b in layer.bottoms] + [f'  top: "{t}"' for t in layer.tops]
        if params:
            lines += [f"  {PARAM_BLOCKS[layer.type]} {{", *(f"    {k}: {v}" for k, v in params.items()), "  }"]
        lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass
class SyntheticFile:
    path: object
    layers: list
    blobs: dict
    prototxt: object = None


def write_synthetic(tmp_path, flavour, keep_rate=0.25, num_classes=19, input_size=SMALL_INPUT,
                    windows=SMALL_WINDOWS, legacy=False, seed=0, name=None, training=False) -> SyntheticFile:
    """training: a training snapshot, with the auxiliary classifiers (in `layers`, which the reference
    runs) and the blob-less data, label and loss layers (in the file only). The prototxt written beside
    it is always the evaluation net's, the one users have."""
    net = ReleasedNet(keep_rate, num_classes, input_size, windows)
    layers = net.flavour_layers(flavour) + (net.aux_classifiers() if training else [])
    blobs = synthetic_blobs(layers, flavour, seed)
    path = tmp_path / (name or f"icnet_{flavour}_{keep_rate:g}{'_train' if training else ''}.caffemodel")
    in_file = [*training_only_layers()[:1], *layers, *training_only_layers()[1:]] if training else layers
    path.write_bytes(encode_caffemodel(in_file, blobs, legacy))
    prototxt = tmp_path / f"icnet_{flavour}_{input_size[0]}x{input_size[1]}.prototxt"
    prototxt.write_text(prototxt_text(net.flavour_layers(flavour), input_size, flavour))
    return SyntheticFile(path, layers, blobs, prototxt)


# --- the Caffe reference: the layer list executed with plain tensor operations ------------------------
def interp_size(length: int, params: dict, axis: str) -> int:
    """PSPNet's Interp layer: shrink (L-1)/s+1, zoom L+(L-1)(z-1), or an explicit height/width."""
    if "shrink_factor" in params:
        return (length - 1) // params["shrink_factor"] + 1
    if "zoom_factor" in params:
        return length + (length - 1) * (params["zoom_factor"] - 1)
    return params[axis]


def interp_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """Rows of corner-aligned bilinear weights, as caffe_gpu_interp2 computes them."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    ratio = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    for i in range(size_out):
        source = ratio * i
        low = int(source)
        high = low + (1 if low < size_in - 1 else 0)
        weight = source - low
        matrix[i, low] += 1 - weight
        matrix[i, high] += weight
    return matrix


def caffe_interp(x, params):
    height = interp_size(x.shape[-2], params, "height")
    width = interp_size(x.shape[-1], params, "width")
    return interp_matrix(x.shape[-2], height) @ x @ interp_matrix(x.shape[-1], width).T


def caffe_max_pool(x, kernel, stride, pad):
    """Caffe's ceil rule, minus a last window that would start in the padding; padding never wins."""
    sizes = []
    for length in x.shape[-2:]:
        out = math.ceil((length + 2 * pad - kernel) / stride) + 1
        if pad and (out - 1) * stride >= length + pad:
            out -= 1
        sizes.append(out)
    extra = [max(0, (out - 1) * stride + kernel - length - pad) for out, length in zip(sizes, x.shape[-2:])]
    padded = F.pad(x, (pad, extra[1], pad, extra[0]), value=-math.inf)
    windows = padded.unfold(2, kernel, stride).unfold(3, kernel, stride)
    return windows.amax(dim=(-2, -1))[..., :sizes[0], :sizes[1]]


def caffe_ave_pool(x, kernel_h, kernel_w, stride_h, stride_w):
    """No padding: ceil((L - k) / s) + 1 windows, each clipped at the edge and averaging what it covers."""
    height, width = x.shape[-2:]
    rows = math.ceil((height - kernel_h) / stride_h) + 1
    cols = math.ceil((width - kernel_w) / stride_w) + 1
    out = x.new_zeros(*x.shape[:2], rows, cols)
    for i in range(rows):
        for j in range(cols):
            top, left = i * stride_h, j * stride_w
            cell = x[..., top:min(top + kernel_h, height), left:min(left + kernel_w, width)]
            out[..., i, j] = cell.mean(dim=(-2, -1))
    return out


def run_layer(layer: Layer, inputs, blobs):
    p = layer.params
    if layer.type == "Scale":
        return inputs[0] * torch.from_numpy(blobs[0]).double().view(1, -1, 1, 1)
    if layer.type == "Interp":
        return caffe_interp(inputs[0], p)
    if layer.type == "Convolution":
        weight = torch.from_numpy(blobs[0]).double()
        bias = torch.from_numpy(blobs[1]).double() if len(blobs) > 1 else None
        return F.conv2d(inputs[0], weight, bias, p["stride"], p["pad"], p["dilation"])
    if layer.type == "BN":
        scale, shift, mean, var = (torch.from_numpy(b).double() for b in blobs)
        return scale * (inputs[0] - mean) / torch.sqrt(var + BN_EPS) + shift
    if layer.type == "ReLU":
        return inputs[0].clamp(min=0)
    if layer.type == "Pooling" and p["pool"] == "MAX":
        return caffe_max_pool(inputs[0], p["kernel_size"], p["stride"], p["pad"])
    if layer.type == "Pooling":
        return caffe_ave_pool(inputs[0], p["kernel_h"], p["kernel_w"], p["stride_h"], p["stride_w"])
    if layer.type == "Eltwise":
        assert len({tuple(t.shape) for t in inputs}) == 1, f"{layer.name}: {[tuple(t.shape) for t in inputs]}"
        return sum(inputs[1:], inputs[0])
    raise AssertionError(f"no reference for {layer.type}")


def caffe_forward(layers: list[Layer], blobs: dict, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every top blob after the net ran on `data` (float64); in-place layers overwrite, as in Caffe."""
    tensors = {"data": data.double()}
    for layer in layers:
        tensors[layer.tops[0]] = run_layer(layer, [tensors[b] for b in layer.bottoms], blobs.get(layer.name))
    return tensors


def random_image(size, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def caffe_input(image: np.ndarray) -> torch.Tensor:
    """What eval_sub.m hands Caffe: RGB minus the mean, channels reversed to B, G, R, as N x C x H x W."""
    centred = image.astype(np.float64) - np.asarray(CAFFE_MEAN_RGB)
    return torch.from_numpy(np.ascontiguousarray(centred[..., ::-1].transpose(2, 0, 1)))[None]


def compare_with_caffe(synthetic: SyntheticFile, model, size) -> dict:
    image = random_image(size)
    reference = caffe_forward(synthetic.layers, synthetic.blobs, caffe_input(image))
    x = image_to_input(image, model.config, frame_order="rgb")
    with torch.no_grad():
        logits = model(x, "sub124").double()
        head = model.branch_logits(x, "sub124").double()
    expected = reference["conv6_interp"]
    assert logits.shape == expected.shape and head.shape == reference["conv6_cls"].shape
    return {**label_comparison(logits, expected),
            "max_abs_diff_conv6_cls": float((head - reference["conv6_cls"]).abs().max())}


def label_comparison(logits: torch.Tensor, expected: torch.Tensor) -> dict:
    max_diff = float((logits - expected).abs().max())
    agree = logits.argmax(1) == expected.argmax(1)
    top2 = expected.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * max_diff  # no rounding within max_diff can flip these
    return {"max_abs_diff": max_diff,
            "max_abs_logit": float(expected.abs().max()),
            "label_agreement": float(agree.double().mean()),
            "disagreements_not_ties": int((~agree & decided).sum())}


# --- the comparison with Caffe ---------------------------------------------------------------------
@pytest.mark.parametrize("flavour", ["bn_merged", "bn_kept"])
def test_imported_model_computes_what_caffe_computes(tmp_path, flavour):
    synthetic = write_synthetic(tmp_path, flavour)
    imported = import_caffemodel(synthetic.path, prototxt=synthetic.prototxt)
    assert imported.flavour == flavour
    config = imported.model.config
    assert config.input_size == SMALL_INPUT and config.pyramid_size == (7, 13)
    assert config.pyramid_windows == SMALL_WINDOWS and config.keep_rate == 0.25
    result = compare_with_caffe(synthetic, imported.model, SMALL_INPUT)
    print(f"{flavour} keep 0.25 {SMALL_INPUT[0]}x{SMALL_INPUT[1]}: {result}")
    assert 1.0 < result["max_abs_logit"] < 100.0  # the comparison is meaningful, not of zeros or of huge values
    assert result["max_abs_diff"] < 1e-4 and result["max_abs_diff_conv6_cls"] < 1e-4
    # Identical labels, except where two classes tie within float32 rounding (none at this seed).
    assert result["disagreements_not_ties"] == 0 and result["label_agreement"] > 0.9999


def released_geometry_comparison(tmp_path, flavour):
    synthetic = write_synthetic(tmp_path, flavour, input_size=RELEASED_INPUT, windows=RELEASED_WINDOWS)
    model = import_caffemodel(synthetic.path).model  # geometry from config/import/icnet_cityscapes_caffe.yaml
    started = time.perf_counter()
    result = compare_with_caffe(synthetic, model, RELEASED_INPUT)
    seconds = time.perf_counter() - started
    print(f"{flavour} keep 0.25 1025x2049 (released geometry): {result} in {seconds:.1f} s")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["bn_merged", "bn_kept"])
def test_released_geometry_computes_what_caffe_computes(tmp_path, flavour):
    result = released_geometry_comparison(tmp_path, flavour)
    assert result["max_abs_diff"] < 1e-4
    assert result["disagreements_not_ties"] == 0 and result["label_agreement"] > 0.9999


# --- the mapping at the released shapes ------------------------------------------------------------
def caffe_name_of(state_key: str) -> str:
    from icnet_ros.model.caffe_import import caffe_layer_name

    module = state_key.rsplit(".", 1)[0]
    if module.endswith((".conv", ".bn")):
        module = module.rsplit(".", 1)[0]
    return caffe_layer_name(module)


@pytest.mark.parametrize("flavour, training", [("bn_merged", False), ("bn_kept", False), ("bn_kept", True)])
def test_every_released_blob_lands_in_its_parameter(tmp_path, flavour, training):
    """Keep rate 0.5, the released shapes: each of our tensors is its Caffe blob (or the exact fold)."""
    synthetic = write_synthetic(tmp_path, flavour, keep_rate=0.5, input_size=RELEASED_INPUT,
                                windows=RELEASED_WINDOWS, training=training)
    imported = import_caffemodel(synthetic.path)
    config = imported.model.config
    assert (config.keep_rate, config.num_classes, config.class_map) == (0.5, 19, "cityscapes")
    assert (config.input_size, config.pyramid_size, config.pyramid_windows) == (RELEASED_INPUT, (33, 65),
                                                                                RELEASED_WINDOWS)
    assert (config.input_channel_order, config.interp, config.aux_heads) == ("bgr", "caffe", training)
    state = imported.model.state_dict()
    checked = 0
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        checked += 1
        expected = expected_tensor(key, synthetic.blobs, flavour)
        np.testing.assert_array_equal(value.numpy(), expected, err_msg=key)
    # 63 convs with their BN, the classifier's weight and bias, and those of the two auxiliary classifiers
    assert checked == 63 * 5 + 2 + (4 if training else 0)
    if training:  # the released shapes: 256 and 128 channels in, 19 classes out
        assert tuple(state["cff_24.aux_classifier.weight"].shape) == (19, 256, 1, 1)
        assert tuple(state["cff_124.aux_classifier.weight"].shape) == (19, 128, 1, 1)


def expected_tensor(key: str, blobs: dict, flavour: str) -> np.ndarray:
    name = caffe_name_of(key)
    conv = blobs[name]
    if name in CLASSIFIERS:
        return conv[0] if key.endswith("weight") else conv[1]
    if key.endswith("conv.weight"):
        reads_input = name in ("conv1_sub1", "conv1_1_3x3_s2")
        return conv[0] * (np.asarray(INPUT_SCALE, np.float32).reshape(1, 3, 1, 1) if reads_input else 1)
    part = key.rsplit(".", 1)[1]
    if flavour == "bn_merged":
        width = conv[1].size
        return {"weight": np.ones(width, np.float32), "bias": conv[1],
                "running_mean": np.zeros(width, np.float32),
                "running_var": np.full(width, 1 - BN_EPS, np.float32)}[part]
    scale, shift, mean, var = (b.reshape(-1) for b in blobs[name + "/bn"])
    return {"weight": scale, "bias": shift, "running_mean": mean, "running_var": var}[part]


def test_legacy_blob_encoding_imports_the_same_weights(tmp_path):
    """num/channels/height/width shapes, unpacked floats and double_data read as the modern encoding."""
    modern = import_caffemodel(write_synthetic(tmp_path, "bn_kept", name="modern.caffemodel").path).model
    legacy_file = write_synthetic(tmp_path, "bn_kept", legacy=True, name="legacy.caffemodel")
    legacy = import_caffemodel(legacy_file.path).model
    for key, value in modern.state_dict().items():
        assert torch.equal(value, legacy.state_dict()[key]), key


def test_prototxt_bn_eps_is_honoured(tmp_path):
    """A prototxt eps other than ours is folded into the variance: var + eps stays what Caffe divides by."""
    synthetic = write_synthetic(tmp_path, "bn_kept")
    synthetic.prototxt.write_text(prototxt_text(synthetic.layers, SMALL_INPUT, "bn_kept", bn_eps=1e-3))
    model = import_caffemodel(synthetic.path, prototxt=synthetic.prototxt).model
    caffe_var = synthetic.blobs["conv4_2_3x3/bn"][3].reshape(-1)
    ours = model.stage4[1].conv.bn
    np.testing.assert_allclose(ours.running_var.numpy() + ours.eps, caffe_var + 1e-3, rtol=1e-6)


# --- errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_net():
    net = ReleasedNet(0.25, 19, SMALL_INPUT, SMALL_WINDOWS)
    layers = net.flavour_layers("bn_kept")
    return layers, synthetic_blobs(layers, "bn_kept")


def import_error(tmp_path, layers, blobs, **kwargs) -> str:
    path = tmp_path / "broken.caffemodel"
    path.write_bytes(encode_caffemodel(layers, blobs))
    with pytest.raises(CaffeImportError) as error:
        import_caffemodel(path, **kwargs)
    return str(error.value)


def test_truncated_file_is_named_with_its_byte(tmp_path, small_net):
    path = tmp_path / "cut.caffemodel"
    data = encode_caffemodel(*small_net)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeImportError, match=r"truncated or not a caffemodel: .*cut\.caffemodel.* at byte \d"):
        import_caffemodel(path)


def test_a_file_that_is_not_protobuf_is_refused(tmp_path):
    path = tmp_path / "photo.caffemodel"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(CaffeImportError, match="truncated or not a caffemodel|not the ICNet authors'"):
        import_caffemodel(path)


def test_corrupted_files_raise_only_caffe_import_errors(tmp_path, small_net):
    """Cut or scrambled bytes anywhere: the reader either reads layers or says the file is broken."""
    from icnet_ros.model.caffe_format import read_caffemodel

    layers, blobs = small_net
    data = encode_caffemodel(layers[:12], blobs)
    rng = np.random.default_rng(0)
    path = tmp_path / "corrupt.caffemodel"
    for trial in range(200):
        corrupt = bytearray(data[: rng.integers(1, len(data))] if trial % 2 else data)
        for position in rng.integers(0, len(corrupt), 3):
            corrupt[position] = rng.integers(0, 256)
        path.write_bytes(bytes(corrupt))
        try:
            read_caffemodel(path)
        except CaffeImportError:
            pass


def test_another_networks_caffemodel_is_named_as_such(tmp_path):
    rng = np.random.default_rng(0)
    vgg = [("conv1_1", 4, [rng.normal(size=(8, 3, 3, 3)), rng.normal(size=8)]), ("relu1_1", 18, []),
           ("conv1_2", 4, [rng.normal(size=(8, 8, 3, 3)), rng.normal(size=8)]),
           ("fc6", 14, [rng.normal(size=(10, 32)), rng.normal(size=10)])]
    path = tmp_path / "vgg16.caffemodel"
    path.write_bytes(encode_v1_net(vgg))
    with pytest.raises(CaffeImportError) as error:
        import_caffemodel(path)
    message = str(error.value)
    assert "not the ICNet authors' caffemodel" in message and "conv1_sub1" in message and "conv6_cls" in message
    assert "conv1_1" in message and "fc6" in message


def test_class_count_must_fit_the_class_map(tmp_path, small_net):
    message = import_error(tmp_path, *small_net, class_map="camvid")
    assert "conv6_cls has 19 outputs" in message and "'camvid' has 11 classes" in message


def test_wrongly_shaped_blob_names_layer_and_both_shapes(tmp_path, small_net):
    layers, blobs = small_net
    broken = dict(blobs)
    broken["conv4_2_3x3"] = [np.zeros((64, 32, 3, 3), np.float32)]
    message = import_error(tmp_path, layers, broken)
    assert message == ("conv4_2_3x3: weight blob has shape (64, 32, 3, 3), expected (64, 64, 3, 3) "
                       "for keep rate 0.25")


def test_wrongly_shaped_bn_blob_is_refused(tmp_path, small_net):
    layers, blobs = small_net
    broken = dict(blobs)
    broken["conv5_4_k1/bn"] = blobs["conv5_4_k1/bn"][:3] + [np.ones((1, 7, 1, 1), np.float32)]
    message = import_error(tmp_path, layers, broken)
    assert message.startswith("conv5_4_k1/bn: variance blob has shape (1, 7, 1, 1), expected (128,)")


def test_missing_bn_layer_is_named(tmp_path, small_net):
    layers, blobs = small_net
    message = import_error(tmp_path, [layer for layer in layers if layer.name != "conv4_2_3x3/bn"], blobs)
    assert "layer conv4_2_3x3/bn (BN) is missing" in message


def test_missing_conv_bias_in_a_merged_file_is_named(tmp_path):
    net = ReleasedNet(0.25, 19, SMALL_INPUT, SMALL_WINDOWS)
    layers = net.flavour_layers("bn_merged")
    blobs = synthetic_blobs(layers, "bn_merged")
    blobs["conv_sub2"] = blobs["conv_sub2"][:1]
    message = import_error(tmp_path, layers, blobs)
    assert "layer conv_sub2 is a Convolution with 1 blobs, expected a Convolution with 2" in message


def test_aux_classifier_with_a_wrong_shape_names_it(tmp_path):
    """sub24_out reads the 64-channel sub24 fusion at keep 0.25; a 128-channel classifier is another net's."""
    synthetic = write_synthetic(tmp_path, "bn_kept", training=True)
    wrong = [np.zeros((19, 128, 1, 1), np.float32), np.zeros(19, np.float32)]
    blobs = {**synthetic.blobs, "sub24_out": wrong}
    layers = synthetic.layers + training_only_layers()
    message = import_error(tmp_path, layers, blobs)
    assert message == ("sub24_out: weight blob has shape (19, 128, 1, 1), expected (19, 64, 1, 1) for keep rate "
                       "0.25 (sub24_out is the sub24 auxiliary classifier on sub24_sum_interp, 64 channels, one "
                       "output per class)")


def test_aux_classifier_for_another_class_count_names_it(tmp_path):
    synthetic = write_synthetic(tmp_path, "bn_merged", training=True)
    blobs = {**synthetic.blobs, "sub4_out": [np.zeros((11, 128, 1, 1), np.float32), np.zeros(11, np.float32)]}
    message = import_error(tmp_path, synthetic.layers, blobs)
    assert message.startswith("sub4_out: weight blob has shape (11, 128, 1, 1), expected (19, 128, 1, 1)")


def test_aux_classifier_reading_another_feature_is_refused(tmp_path):
    """Same shapes, other input: conv3_1 is as wide as conv5_4_k1 and at H/16, but not our sub4 head's."""
    net = ReleasedNet(0.25, 19, SMALL_INPUT, SMALL_WINDOWS)
    layers = net.flavour_layers("bn_merged") + net.aux_classifiers(("conv3_1", "sub24_sum_interp"))
    blobs = synthetic_blobs(layers, "bn_merged")
    assert blobs["sub4_out"][0].shape == (19, 128, 1, 1)  # the shape conv5_4_interp needs: only the input is wrong
    message = import_error(tmp_path, layers, blobs)
    assert message.endswith("sub4_out reads conv3_1, but icnet_ros's sub4 head classifies "
                            "conv5_4_interp (or conv5_4_k1 before that Interp), as the ICNet training net's "
                            "sub4_out does; this sub4_out belongs to another network")


def import_warnings(caplog, path, **kwargs):
    """(imported model, the importer's warning messages)."""
    with caplog.at_level(logging.WARNING, logger="icnet_ros.model.caffe_import"):
        imported = import_caffemodel(path, **kwargs)
    return imported, [r.getMessage() for r in caplog.records if r.name == "icnet_ros.model.caffe_import"]


def test_extra_layers_with_weights_are_skipped_with_one_warning(tmp_path, small_net, caplog):
    """As Caffe's CopyTrainedLayersFrom: unknown weight layers are ignored, all named in one warning;
    blob-less layers (data, label Interp, losses) are not worth a mention."""
    layers, blobs = small_net
    extras = [Layer("conv5_3_pool1_conv", "Convolution", ("conv5_3_pool1",), ("conv5_3_pool1_conv",)),
              Layer("fc_extra", "InnerProduct", ("conv5_3",), ("fc_extra",))]
    extra_blobs = {"conv5_3_pool1_conv": [np.ones((128, 512, 1, 1), np.float32)],
                   "fc_extra": [np.ones((10, 32), np.float32), np.ones(10, np.float32)]}
    path = tmp_path / "with_extras.caffemodel"
    in_file = training_only_layers()[:1] + layers + extras + training_only_layers()[1:]
    path.write_bytes(encode_caffemodel(in_file, {**blobs, **extra_blobs}))
    imported, messages = import_warnings(caplog, path)
    assert len(messages) == 1
    assert messages[0].endswith("skipped 2 layer(s) with weights that icnet_ros's ICNet has no place for "
                                "(Caffe's own loader ignores them too): conv5_3_pool1_conv (Convolution, "
                                "blobs [(128, 512, 1, 1)]), fc_extra (InnerProduct, blobs [(10, 32), (10,)])")
    assert "loss_" not in messages[0] and "label_" not in messages[0]
    assert imported.skipped == ("conv5_3_pool1_conv", "fc_extra")
    assert imported.provenance["skipped_layers"] == ["conv5_3_pool1_conv", "fc_extra"]
    assert imported.model.config.aux_heads is False
    plain = tmp_path / "plain.caffemodel"
    plain.write_bytes(encode_caffemodel(layers, blobs))
    for key, value in import_caffemodel(plain).model.state_dict().items():
        assert torch.equal(value, imported.model.state_dict()[key]), key


def test_a_lone_aux_classifier_is_skipped_and_says_why(tmp_path, small_net, caplog):
    """Our aux heads come as a pair: sub4_out without sub24_out cannot give a sub4-only network."""
    layers, blobs = small_net
    aux = ReleasedNet(0.25, 19, SMALL_INPUT, SMALL_WINDOWS).aux_classifiers()[:1]
    path = tmp_path / "lone_aux.caffemodel"
    path.write_bytes(encode_caffemodel(layers + aux, {**blobs, **synthetic_blobs(layers + aux, "bn_kept")}))
    imported, messages = import_warnings(caplog, path)
    assert len(messages) == 1 and "sub4_out (Convolution, blobs [(19, 128, 1, 1), (19,)])" in messages[0]
    assert messages[0].endswith("the auxiliary classifier sub4_out is imported only together with sub24_out, "
                                "which the file lacks, so the checkpoint has the sub124 head only")
    assert imported.model.config.branches == ("sub124",)


def compare_aux_with_caffe(synthetic: SyntheticFile, model, size) -> dict:
    """Each aux branch against the training net's classifier: at its own resolution (branch_logits) and
    at the input size (the model's corner-aligned bilinear upsample, here as Caffe's Interp to that size)."""
    image = random_image(size)
    reference = caffe_forward(synthetic.layers, synthetic.blobs, caffe_input(image))
    x = image_to_input(image, model.config, frame_order="rgb")
    result = {}
    for branch, caffe_name in AUX_OUTPUTS.items():
        with torch.no_grad():
            head = model.branch_logits(x, branch).double()
            full = model(x, branch).double()
        expected = reference[caffe_name]
        expected_full = caffe_interp(expected, {"height": size[0], "width": size[1]})
        assert head.shape == expected.shape and full.shape == expected_full.shape, branch
        result[branch] = {**label_comparison(full, expected_full),
                          "max_abs_diff_head": float((head - expected).abs().max())}
    return result


@pytest.mark.parametrize("flavour", ["bn_merged", "bn_kept"])
def test_training_snapshot_aux_branches_compute_what_caffe_computes(tmp_path, flavour, caplog):
    """A training snapshot: sub4_out and sub24_out become our sub4 / sub24 heads, with the evaluation
    prototxt (which has no aux classifiers); its loss and label layers pass without a warning."""
    synthetic = write_synthetic(tmp_path, flavour, training=True)
    imported, messages = import_warnings(caplog, synthetic.path, prototxt=synthetic.prototxt)
    assert messages == [] and imported.skipped == ()
    assert imported.model.config.aux_heads and imported.model.config.branches == ("sub4", "sub24", "sub124")
    assert imported.provenance["aux_classifiers"] == {"sub4": "sub4_out", "sub24": "sub24_out"}
    aux = compare_aux_with_caffe(synthetic, imported.model, SMALL_INPUT)
    print(f"{flavour} training snapshot keep 0.25: {aux}")
    for branch, result in aux.items():
        assert 1.0 < result["max_abs_logit"] < 100.0, branch
        assert result["max_abs_diff"] < 1e-4 and result["max_abs_diff_head"] < 1e-4, branch
        assert result["disagreements_not_ties"] == 0 and result["label_agreement"] > 0.9999, branch
    sub124 = compare_with_caffe(synthetic, imported.model, SMALL_INPUT)
    assert sub124["max_abs_diff"] < 1e-4 and sub124["disagreements_not_ties"] == 0


def test_prototxt_with_aux_classifiers_checks_them(tmp_path):
    """A training-style prototxt that lists the aux classifiers has them checked like every other conv."""
    synthetic = write_synthetic(tmp_path, "bn_merged", training=True)
    net = ReleasedNet(0.25, 19, SMALL_INPUT, SMALL_WINDOWS)
    aux = net.aux_classifiers()
    aux[1].params["kernel_size"] = 3
    text = prototxt_text(net.flavour_layers("bn_merged") + aux, SMALL_INPUT, "bn_merged")
    synthetic.prototxt.write_text(text)
    with pytest.raises(CaffeImportError, match=r"sub24_out has kernel \(3, 3\), but icnet_ros's "
                                               r"cff_124\.aux_classifier .* has \(1, 1\)"):
        import_caffemodel(synthetic.path, prototxt=synthetic.prototxt)


def test_input_scale_with_a_bias_is_refused(tmp_path, small_net):
    layers, blobs = small_net
    broken = {**blobs, "data_sub1": [np.ones(3, np.float32), np.ones(3, np.float32)]}
    message = import_error(tmp_path, layers, broken)
    assert "data_sub1 is a Scale with 2 blobs, expected a Scale with 1" in message


def test_prototxt_that_differs_from_our_model_names_the_layer(tmp_path):
    synthetic = write_synthetic(tmp_path, "bn_merged")
    text = synthetic.prototxt.read_text()
    start = text.index('name: "conv4_3_3x3"')
    text = text[:start] + text[start:].replace("dilation: 2", "dilation: 1", 1)
    synthetic.prototxt.write_text(text)
    with pytest.raises(CaffeImportError, match=r"conv4_3_3x3 has dilation \(1, 1\), but icnet_ros's stage4\.2"):
        import_caffemodel(synthetic.path, prototxt=synthetic.prototxt)


def test_prototxt_input_size_must_be_caffe_valid(tmp_path):
    synthetic = write_synthetic(tmp_path, "bn_merged")
    synthetic.prototxt.write_text(synthetic.prototxt.read_text().replace("input_dim: 193", "input_dim: 192"))
    with pytest.raises(CaffeImportError, match=r"input size 192x385 .*32k\+1.*nearest: 193x385"):
        import_caffemodel(synthetic.path, prototxt=synthetic.prototxt)


def test_prototxt_pooling_that_does_not_give_its_bins_is_refused(tmp_path):
    """129x257 has a 5x9 conv5_3: Caffe cannot pool it into 6 unpadded rows."""
    net = ReleasedNet(0.25, 19, (129, 257), ((5, 9, 5, 9), (3, 5, 2, 4), (3, 5, 1, 2), (1, 3, 1, 1)))
    synthetic = write_synthetic(tmp_path, "bn_merged")
    synthetic.prototxt.write_text(prototxt_text(net.flavour_layers("bn_merged"), (129, 257), "bn_merged"))
    with pytest.raises(CaffeImportError, match="conv5_3_pool6 .* gives 5 cells along the 5-pixel conv5_3 "
                                               "height, expected 6"):
        import_caffemodel(synthetic.path, prototxt=synthetic.prototxt)


# --- the command line ------------------------------------------------------------------------------
def test_cli_writes_a_checkpoint_the_engine_loads(tmp_path, capsys):
    synthetic = write_synthetic(tmp_path, "bn_merged", input_size=RELEASED_INPUT, windows=RELEASED_WINDOWS)
    output = tmp_path / "models" / "icnet_cityscapes_keep0.25.safetensors"
    assert main([str(synthetic.path), "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    for expected in (f"wrote {output}", "flavour bn_merged", "keep rate 0.25", "19 classes (cityscapes)",
                     "input 1025x2049 BGR", "icnet-evaluate", "compression:=0.25"):
        assert expected in printed, expected
    model = load_model(output, expected_num_classes=19, expected_class_map="cityscapes")
    config = model.config
    assert (config.input_channel_order, config.input_size, config.aux_heads) == ("bgr", RELEASED_INPUT, False)
    provenance = read_checkpoint(output)[2]
    assert provenance["source"] == synthetic.path.name and provenance["flavour"] == "bn_merged"
    assert provenance["source_md5"] == hashlib.md5(synthetic.path.read_bytes()).hexdigest()
    assert "released_file" not in provenance


def test_cli_default_output_is_beside_the_caffemodel(tmp_path, capsys):
    synthetic = write_synthetic(tmp_path, "bn_kept", input_size=RELEASED_INPUT, windows=RELEASED_WINDOWS)
    assert main([str(synthetic.path), "--prototxt", str(synthetic.prototxt)]) == 0
    assert synthetic.path.with_suffix(".safetensors").is_file()
    assert f"geometry from {synthetic.prototxt.name}" in capsys.readouterr().out


def test_cli_imports_a_training_snapshot_with_its_aux_branches(tmp_path, capsys):
    """The checkpoint records the sub4 / sub24 heads: the engine, evaluation and node accept those branches."""
    synthetic = write_synthetic(tmp_path, "bn_kept", training=True)
    output = tmp_path / "icnet_train.safetensors"
    assert main([str(synthetic.path), "-o", str(output), "--prototxt", str(synthetic.prototxt)]) == 0
    captured = capsys.readouterr()
    assert "sub4, sub24 and sub124 heads (sub4_out, sub24_out imported)" in captured.out
    assert captured.err == ""
    model = load_model(output, expected_num_classes=19)
    assert model.config.aux_heads and check_branch("sub4", model.config) == "sub4"
    assert read_checkpoint(output)[2]["aux_classifiers"] == {"sub4": "sub4_out", "sub24": "sub24_out"}
    result = compare_aux_with_caffe(synthetic, model, SMALL_INPUT)
    assert max(r["max_abs_diff"] for r in result.values()) < 1e-4


def test_cli_prints_the_skipped_layers_warning_once(tmp_path, small_net, capsys, caplog):
    layers, blobs = small_net
    extra = Layer("fc_extra", "InnerProduct", ("conv5_3",), ("fc_extra",))
    path = tmp_path / "extra.caffemodel"
    extra_blobs = {"fc_extra": [np.ones((10, 32), np.float32)]}
    path.write_bytes(encode_caffemodel(layers + [extra], {**blobs, **extra_blobs}))
    assert main([str(path), "-o", str(tmp_path / "extra.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("icnet-import: warning: ") == 1 and err.count("\n") == 1
    assert "skipped 1 layer(s)" in err and "fc_extra (InnerProduct, blobs [(10, 32)])" in err
    logged = [r for r in caplog.records if r.name == "icnet_ros.model.caffe_import"]
    assert not logged  # printed, not also logged


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "empty.caffemodel"
    path.write_bytes(b"")
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("icnet-import: ") and "not the ICNet authors' caffemodel" in err
    assert main([str(tmp_path / "absent.caffemodel")]) == 1
    assert "absent.caffemodel does not exist" in capsys.readouterr().err


def test_released_file_is_recognised_by_its_md5(tmp_path):
    """The provenance records the authors' mIoU when the md5 is one of the released files'."""
    import yaml

    from icnet_ros.paths import config_dir

    synthetic = write_synthetic(tmp_path, "bn_merged", input_size=RELEASED_INPUT, windows=RELEASED_WINDOWS)
    settings = yaml.safe_load((config_dir() / "import" / "icnet_cityscapes_caffe.yaml").read_text())
    assert {entry["md5"] for entry in settings["released_files"]} == {
        "c7038630c4b6c869afaaadd811bdb539", "6da59a72a254862106420983a7723624",
        "4f4dd9eecd465dd8de7e4cf88ba5d5d5", "ba3cf6e24beb07068dacc901a9c7f28b"}
    settings["released_files"][0]["md5"] = hashlib.md5(synthetic.path.read_bytes()).hexdigest()
    custom = tmp_path / "released.yaml"
    custom.write_text(yaml.safe_dump(settings))
    provenance = import_caffemodel(synthetic.path, released_config=custom).provenance
    assert provenance["released_file"] == "icnet_cityscapes_train_30k.caffemodel"
    assert provenance["released_miou_val"] == 67.7
