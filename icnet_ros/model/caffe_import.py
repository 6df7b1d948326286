"""`icnet-import`: the ICNet authors' released Caffe weights -> an icnet_ros checkpoint.

    icnet-import icnet_cityscapes_train_30k.caffemodel       # -> icnet_cityscapes_train_30k.safetensors
    icnet-import icnet_cityscapes_train_30k_bnnomerge.caffemodel -o cityscapes.safetensors \\
        --prototxt icnet_cityscapes_bnnomerge.prototxt           # geometry from the network definition

Both released flavours are read: "bn_merged" (BN merged into conv biases by the authors) and
"bn_kept" (the _bnnomerge files, with PSPNet's Caffe "BN" layers). Every layer of the evaluation
network maps to one of our modules by name (caffe_layer_name); its blob shapes must be exactly our
parameter shapes at the keep rate read from conv1_sub1. The released nets scale the input by a
per-channel Caffe "Scale" layer (data_sub1): that folds exactly into the input channels of the two
convolutions that read it.

Files saved from a training net hold more: the auxiliary classifiers of the cascade label guidance
(sub4_out, sub24_out) become our sub4 / sub24 heads when both are present, and layers with weights
we have no place for are skipped with one warning naming them all, as Caffe's own loader
(Net::CopyTrainedLayersFrom) ignores source layers its target net lacks. Layers without weights
(data, label Interp, losses) carry nothing to import and are passed over silently.

What the weights compute also depends on the input (mean, BGR order, 1025x2049) and on the pyramid
pooling windows; those live in config/import/icnet_cityscapes_caffe.yaml, or come from --prototxt.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from icnet_ros import __version__
from icnet_ros.classmap import ClassMapError, load_class_map
from icnet_ros.config import ConfigError, config_from_dict, read_yaml_mapping
from icnet_ros.model.caffe_format import CaffeImportError, CaffeLayer, parse_prototxt, read_caffemodel
from icnet_ros.model.checkpoint import CheckpointError, save_model
from icnet_ros.model.icnet import (
    PYRAMID_BINS,
    RELEASED_KEEP_RATE,
    RELEASED_WIDTHS,
    ConvBN,
    ICNet,
    ModelConfig,
    channel_widths,
)
from icnet_ros.paths import config_dir

__all__ = ["CaffeImportError", "ImportedModel", "caffe_layer_name", "import_caffemodel", "main"]

LOG = logging.getLogger(__name__)

IMPORTER_VERSION = 2  # 2: auxiliary classifiers imported, unknown weight layers skipped with a warning
RELEASED_CONFIG = Path("import") / "icnet_cityscapes_caffe.yaml"  # under icnet_ros.paths.config_dir()

# Caffe layer names of the released evaluation network (evaluation/prototxt/icnet_cityscapes*.prototxt).
INPUT_SCALE = "data_sub1"  # Scale layer on the input; conv1_sub1 reads it, and conv1_1_3x3_s2 its Interp
INPUT_CONVS = ("conv1_sub1", "conv1_1_3x3_s2")
CLASSIFIER = "conv6_cls"
BN_SUFFIX = "/bn"  # "<conv name>/bn" is the BN layer after each convolution in the _bnnomerge files
PYRAMID_POOL = "conv5_3_pool{bins}"
PYRAMID_INTERP = "conv5_3_pool{bins}_interp"
# The released net's total stride. At sizes of the form 32k+1 every Caffe Interp zoom lands exactly on
# the size of the map it is summed with, and the output on the input size (1025 = 32*32+1).
CAFFE_SIZE_STEP = 32

FLAVOURS = {"bn_merged": "BN merged into the conv biases", "bn_kept": "BN layers kept (_bnnomerge)"}

# Our module path -> Caffe layer, for the convolutions outside the residual stages.
FIXED_CONV_NAMES = {
    "sub1.0": "conv1_sub1", "sub1.1": "conv2_sub1", "sub1.2": "conv3_sub1",
    "stem.0": "conv1_1_3x3_s2", "stem.1": "conv1_2_3x3", "stem.2": "conv1_3_3x3",
    "conv5_4": "conv5_4_k1",
    "cff_24.dilated": "conv_sub4", "cff_24.lateral": "conv3_1_sub2_proj",
    "cff_124.dilated": "conv_sub2", "cff_124.lateral": "conv3_sub1_proj",
    "classifier": CLASSIFIER,
}
# Residual stages: our stage -> (Caffe stage number, Caffe number of our block 0): stage4.1 is conv4_2.
STAGE_BLOCKS = {"stage2": (2, 1), "stage3_rest": (3, 2), "stage4": (4, 1), "stage5": (5, 1)}
BOTTLENECK_CONVS = {"reduce": "1x1_reduce", "conv": "3x3", "increase": "1x1_increase", "projection": "1x1_proj"}


@dataclass(frozen=True)
class AuxClassifier:
    """One auxiliary classifier of the ICNet training net (cascade label guidance) and our head for it."""

    module: str  # our 1x1 conv with bias
    caffe: str  # the training net's Convolution layer
    branch: str
    reads: tuple[str, ...]  # the Caffe blobs whose features our head classifies


# The training net feeds sub4_out the conv5_4 features zoomed to H/16 (conv5_4_interp) and sub24_out the
# sub24 fusion zoomed to H/8 (sub24_sum_interp), exactly what our cff_24 / cff_124 heads classify
# (hellochick/ICNet-tensorflow, whose layer names follow the authors' nets; the authors publish only the
# evaluation prototxt). The map before the Interp is accepted too: a 1x1 conv with bias commutes with
# Caffe's Interp, whose bilinear weights sum to 1.
AUX_CLASSIFIERS = (
    AuxClassifier("cff_24.aux_classifier", "sub4_out", "sub4", ("conv5_4_interp", "conv5_4_k1")),
    AuxClassifier("cff_124.aux_classifier", "sub24_out", "sub24", ("sub24_sum_interp", "sub24_sum")),
)


# --- names -----------------------------------------------------------------------------------------
def caffe_layer_name(module_path: str) -> str:
    """The Caffe convolution behind one of our modules, e.g. 'stage4.1.conv' -> 'conv4_2_3x3'."""
    if module_path in FIXED_CONV_NAMES:
        return FIXED_CONV_NAMES[module_path]
    aux = next((aux for aux in AUX_CLASSIFIERS if aux.module == module_path), None)
    if aux is not None:
        return aux.caffe
    parts = module_path.split(".")
    if parts[0] == "stage3_1" and len(parts) == 2:
        block, part = "conv3_1", parts[1]
    elif parts[0] in STAGE_BLOCKS and len(parts) == 3:
        stage, first = STAGE_BLOCKS[parts[0]]
        block, part = f"conv{stage}_{int(parts[1]) + first}", parts[2]
    else:
        raise KeyError(f"no Caffe layer is known for module {module_path!r}")
    return f"{block}_{BOTTLENECK_CONVS[part]}"


@dataclass(frozen=True)
class ConvTarget:
    """One of our convolutions and the Caffe layer(s) its weights come from."""

    module: str
    caffe: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None  # None for the classifiers, whose convs have a bias instead


def conv_targets(model: ICNet) -> list[ConvTarget]:
    targets = [ConvTarget(path, caffe_layer_name(path), module.conv, module.bn)
               for path, module in model.named_modules() if isinstance(module, ConvBN)]
    targets.append(ConvTarget("classifier", CLASSIFIER, model.classifier, None))
    if model.config.aux_heads:
        targets += [ConvTarget(aux.module, aux.caffe, model.get_submodule(aux.module), None)
                    for aux in AUX_CLASSIFIERS]
    return targets


# --- the released network's settings (YAML) and geometry -------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """What the weights compute besides the weights: the input size and the pyramid pooling windows."""

    input_size: tuple[int, int]
    pyramid_windows: tuple[tuple[int, int, int, int], ...]
    source: str  # where it came from, for the provenance
    bn_eps: dict[str, float] = field(default_factory=dict)  # per BN layer, from a prototxt's bn_param

    @property
    def pyramid_size(self) -> tuple[int, int]:
        return conv5_3_size(self.input_size)


def conv5_3_size(input_size) -> tuple[int, int]:
    """The feature size the pyramid pools, at a 32k+1 input: k+1 (33x65 at 1025x2049)."""
    return tuple((side - 1) // CAFFE_SIZE_STEP + 1 for side in input_size)


@dataclass(frozen=True)
class ReleasedNetwork:
    """config/import/icnet_cityscapes_caffe.yaml: the ModelConfig fields, BN eps and known files."""

    model: dict
    bn_eps: float
    files: tuple[dict, ...]
    geometry: Geometry


def load_released_network(path: str | Path | None = None) -> ReleasedNetwork:
    path = Path(path) if path is not None else config_dir() / RELEASED_CONFIG
    data = read_yaml_mapping(path)
    model = dict(data.get("model") or {})
    windows = tuple(tuple(window) for window in model.get("pyramid_windows", ()))
    geometry = Geometry(tuple(model.get("input_size") or ()), windows, source=path.name)
    check_geometry(geometry, str(path))
    if tuple(model.get("pyramid_size") or ()) != geometry.pyramid_size:
        raise CaffeImportError(f"{path}: pyramid_size {model.get('pyramid_size')} is not the conv5_3 size "
                               f"{list(geometry.pyramid_size)} of input_size {list(geometry.input_size)}")
    if "caffe_bn_eps" not in data:
        raise CaffeImportError(f"{path}: caffe_bn_eps is missing (the eps of PSPNet's Caffe BN layers)")
    files = tuple(data.get("released_files") or ())
    return ReleasedNetwork(model, float(data["caffe_bn_eps"]), files, geometry)


def check_geometry(geometry: Geometry, where: str) -> None:
    """Raise unless Caffe runs the released net at this size and each pooling gives exactly its bins."""
    check_input_size(geometry.input_size, where)
    if len(geometry.pyramid_windows) != len(PYRAMID_BINS):
        raise CaffeImportError(f"{where}: expected {len(PYRAMID_BINS)} pyramid pooling windows (bins "
                               f"{PYRAMID_BINS}), got {len(geometry.pyramid_windows)}")
    for bins, window in zip(PYRAMID_BINS, geometry.pyramid_windows):
        _check_pooling_window(bins, window, geometry.pyramid_size, where)


def check_input_size(input_size, where: str) -> None:
    height, width = input_size if len(input_size) == 2 else (0, 0)
    if height < CAFFE_SIZE_STEP + 1 or width < CAFFE_SIZE_STEP + 1 or (height - 1) % CAFFE_SIZE_STEP \
            or (width - 1) % CAFFE_SIZE_STEP:
        def nearest(side):
            return max(1, round((side - 1) / CAFFE_SIZE_STEP)) * CAFFE_SIZE_STEP + 1
        raise CaffeImportError(
            f"{where}: input size {height}x{width} does not fit the released network: its Interp zooms line up "
            f"with its Eltwise sums only at sizes {CAFFE_SIZE_STEP}k+1, such as 1025x2049 (nearest: "
            f"{nearest(height)}x{nearest(width)})")


def _check_pooling_window(bins: int, window, size: tuple[int, int], where: str) -> None:
    """Caffe AVE pooling without padding gives ceil((size - kernel) / stride) + 1 cells per axis;
    our fixed-window pooling assumes that this is the bin count and that every window starts inside."""
    kernel_h, kernel_w, stride_h, stride_w = window
    axes = (("height", size[0], kernel_h, stride_h), ("width", size[1], kernel_w, stride_w))
    for axis, side, kernel, stride in axes:
        cells = -(-(side - kernel) // stride) + 1 if kernel >= 1 and stride >= 1 else 0
        if cells != bins or (bins - 1) * stride >= side:
            raise CaffeImportError(
                f"{where}: {PYRAMID_POOL.format(bins=bins)} (kernel {kernel}, stride {stride}) gives {cells} "
                f"cells along the {side}-pixel conv5_3 {axis}, expected {bins}; choose kernel and stride with "
                f"ceil(({side} - kernel) / stride) + 1 = {bins}")


# --- geometry and checks from a prototxt -------------------------------------------------------------
def prototxt_layers(net: dict) -> dict[str, dict]:
    return {layer.get("name", [""])[0]: layer for layer in net.get("layer", []) + net.get("layers", [])}


def prototxt_geometry(path: Path, net: dict, default_eps: float) -> Geometry:
    layers = prototxt_layers(net)
    input_size = _prototxt_input_size(net, layers, path)
    check_input_size(input_size, f"prototxt {path}")
    windows = tuple(_prototxt_pooling_window(layers, bins, conv5_3_size(input_size), path)
                    for bins in PYRAMID_BINS)
    eps = {name: float(_one(layer.get("bn_param", [{}])[0], "eps", default_eps))
           for name, layer in layers.items() if _one(layer, "type", "") == "BN"}
    geometry = Geometry(input_size, windows, source=path.name, bn_eps=eps)
    check_geometry(geometry, f"prototxt {path}")
    return geometry


def _one(message: dict, key: str, default=None):
    values = message.get(key)
    return values[0] if values else default


def _prototxt_input_size(net: dict, layers: dict[str, dict], path: Path) -> tuple[int, int]:
    dims = net.get("input_dim") or _one(net, "input_shape", {}).get("dim")
    for layer in layers.values():
        if not dims and _one(layer, "type") == "Input":
            dims = _one(_one(layer, "input_param", {}), "shape", {}).get("dim")
    if not dims or len(dims) != 4:
        raise CaffeImportError(f"prototxt {path} declares no 4-D input size (input_dim: 1, 3, H, W, as the "
                               f"released icnet_cityscapes.prototxt does); found {dims}")
    return int(dims[2]), int(dims[3])


def _prototxt_layer(layers: dict[str, dict], name: str, layer_type: str, path: Path) -> dict:
    layer = layers.get(name)
    if layer is None or _one(layer, "type") != layer_type:
        found = "missing" if layer is None else f"of type {_one(layer, 'type')}"
        raise CaffeImportError(f"prototxt {path}: layer {name} is {found}; the released ICNet has a "
                               f"{layer_type} layer of that name")
    return layer


def _pair(param: dict, name: str, default: int) -> tuple[int, int]:
    """Caffe's (h, w) of kernel/stride/pad/dilation: name_h + name_w, or one or two repeated values."""
    if f"{name}_h" in param or f"{name}_w" in param:
        return int(_one(param, f"{name}_h", default)), int(_one(param, f"{name}_w", default))
    values = param.get("kernel_size" if name == "kernel" else name) or [default]
    return int(values[0]), int(values[-1])


def _prototxt_pooling_window(layers, bins: int, size, path: Path) -> tuple[int, int, int, int]:
    name = PYRAMID_POOL.format(bins=bins)
    param = _one(_prototxt_layer(layers, name, "Pooling", path), "pooling_param", {})
    if _one(param, "pool", "MAX") != "AVE" or _pair(param, "pad", 0) != (0, 0) \
            or _one(param, "global_pooling") == "true":
        raise CaffeImportError(f"prototxt {path}: {name} must be AVE pooling with kernel and stride and no "
                               f"padding, as in the released network; got {param}")
    interp = _one(_prototxt_layer(layers, PYRAMID_INTERP.format(bins=bins), "Interp", path), "interp_param", {})
    target = (_one(interp, "height"), _one(interp, "width"))
    if target != tuple(size):
        raise CaffeImportError(f"prototxt {path}: {PYRAMID_INTERP.format(bins=bins)} resizes to {target}, "
                               f"but conv5_3 is {size[0]}x{size[1]} for the declared input size")
    return (*_pair(param, "kernel", 0), *_pair(param, "stride", 1))


def check_prototxt_convs(net: dict, targets: list[ConvTarget], keep_rate: float, path: Path) -> None:
    """Every convolution of ours must be the prototxt's: outputs, kernel, stride, padding, dilation.

    The auxiliary classifiers are checked where the prototxt has them: the evaluation prototxt, the one
    users have, does not."""
    layers = prototxt_layers(net)
    aux_names = {aux.caffe for aux in AUX_CLASSIFIERS}
    for target in targets:
        if target.caffe in aux_names and target.caffe not in layers:
            continue
        param = _one(_prototxt_layer(layers, target.caffe, "Convolution", path), "convolution_param", {})
        conv = target.conv
        given = {"num_output": int(_one(param, "num_output", 0)), "kernel": _pair(param, "kernel", 0),
                 "stride": _pair(param, "stride", 1), "pad": _pair(param, "pad", 0),
                 "dilation": _pair(param, "dilation", 1), "group": int(_one(param, "group", 1))}
        ours = {"num_output": conv.out_channels, "kernel": tuple(conv.kernel_size),
                "stride": tuple(conv.stride), "pad": tuple(conv.padding), "dilation": tuple(conv.dilation),
                "group": conv.groups}
        for key, value in given.items():
            if value != ours[key]:
                raise CaffeImportError(
                    f"prototxt {path}: {target.caffe} has {key} {value}, but icnet_ros's {target.module} (keep "
                    f"rate {keep_rate:g}, as the weights) has {ours[key]}; the prototxt is not the released "
                    f"ICNet's")


# --- weights ---------------------------------------------------------------------------------------
def index_layers(layers: list[CaffeLayer], path: Path) -> dict[str, CaffeLayer]:
    """Layers by name; raises unless this looks like the released ICNet (conv1_sub1 ... conv6_cls)."""
    by_name: dict[str, CaffeLayer] = {}
    for layer in layers:
        if layer.name in by_name and layer.blobs and by_name[layer.name].blobs:
            raise CaffeImportError(f"{path}: two layers named {layer.name} carry weights")
        if layer.blobs or layer.name not in by_name:
            by_name[layer.name] = layer
    expected = (INPUT_CONVS[0], CLASSIFIER)
    missing = [name for name in expected if not (name in by_name and by_name[name].blobs)]
    if missing:
        with_weights = [layer.name for layer in layers if layer.blobs] or [layer.name for layer in layers]
        raise CaffeImportError(
            f"{path} is not the ICNet authors' caffemodel: expected weight layers {', '.join(expected)} "
            f"(and {INPUT_SCALE}, conv1_1_3x3_s2 ...), but it has no {' or '.join(missing)}; its "
            f"{len(layers)} layers include {with_weights[:6] or 'none'}")
    return by_name


def detect_keep_rate(by_name: dict[str, CaffeLayer], path: Path) -> float:
    """The keep rate from conv1_sub1's outputs: 32 at the released 0.5, every width scales with it."""
    weight = by_name[INPUT_CONVS[0]].blobs[0]
    released_outputs = RELEASED_WIDTHS["sub1"][0]
    if weight.ndim != 4:
        raise CaffeImportError(f"{path}: {INPUT_CONVS[0]} weight blob has shape {weight.shape}, expected 4-D "
                               f"(outputs, 3, 3, 3)")
    keep_rate = weight.shape[0] * RELEASED_KEEP_RATE / released_outputs
    try:
        channel_widths(keep_rate)
    except ValueError as error:
        raise CaffeImportError(f"{path}: {INPUT_CONVS[0]} has {weight.shape[0]} outputs ({released_outputs} at "
                               f"the released keep rate {RELEASED_KEEP_RATE}): {error}") from error
    return keep_rate


def checked_num_classes(by_name: dict[str, CaffeLayer], class_map: str, path: Path) -> int:
    outputs = by_name[CLASSIFIER].blobs[0].shape[0]
    expected = load_class_map(class_map).num_classes
    if outputs != expected:
        raise CaffeImportError(f"{path}: {CLASSIFIER} has {outputs} outputs, but class map {class_map!r} has "
                               f"{expected} classes; give the class map the weights were trained for with "
                               f"--class-map (the released Cityscapes files predict 19 classes: cityscapes)")
    return outputs


def detect_flavour(by_name: dict[str, CaffeLayer]) -> str:
    return "bn_kept" if any(layer.type == "BN" and layer.blobs for layer in by_name.values()) else "bn_merged"


class _WeightReader:
    """Takes blobs out of the Caffe layers with shape checks, remembering which layers it used."""

    def __init__(self, by_name: dict[str, CaffeLayer], keep_rate: float, path: Path):
        self.by_name, self.keep_rate, self.path = by_name, keep_rate, path
        self.used: set[str] = set()

    def layer(self, name: str, layer_type: str, blob_counts: tuple[int, ...], why: str = "") -> CaffeLayer:
        layer = self.by_name.get(name)
        if layer is None or not layer.blobs:
            raise CaffeImportError(f"{self.path}: layer {name} ({layer_type}) is missing or has no "
                                   f"weights{why}")
        if layer.type != layer_type or len(layer.blobs) not in blob_counts:
            raise CaffeImportError(
                f"{self.path}: layer {name} is a {layer.type} with {len(layer.blobs)} blobs, expected a "
                f"{layer_type} with {' or '.join(map(str, blob_counts))}{why}")
        self.used.add(name)
        return layer

    def tensor(self, layer: CaffeLayer, index: int, role: str, expected: tuple[int, ...],
               note: str = "") -> torch.Tensor:
        """Blob `index` as a float32 tensor of shape `expected`; vectors may come as (1, C, 1, 1) too."""
        blob = layer.blobs[index]
        fits = blob.shape == expected or (len(expected) == 1 and blob.size == expected[0]
                                          and sum(d != 1 for d in blob.shape) <= 1)
        if not fits:
            wanted = f"{expected}" if len(expected) > 1 else f"{expected} or (1, {expected[0]}, 1, 1)"
            raise CaffeImportError(f"{layer.name}: {role} blob has shape {blob.shape}, expected {wanted} for "
                                   f"keep rate {self.keep_rate:g}{note}")
        return torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32).reshape(expected))


def imported_state(reader: _WeightReader, targets: list[ConvTarget], flavour: str, geometry: Geometry,
                   default_eps: float) -> dict[str, torch.Tensor]:
    """Our parameters and BN buffers from the Caffe blobs, with the input Scale folded in."""
    state = {}
    for target in targets:
        caffe_eps = geometry.bn_eps.get(target.caffe + BN_SUFFIX, default_eps)
        state.update(_conv_state(reader, target, flavour, caffe_eps))
    _fold_input_scale(reader, targets, state)
    return state


def _conv_state(reader: _WeightReader, target: ConvTarget, flavour: str, caffe_eps: float) -> dict:
    conv = target.conv
    out = conv.out_channels
    if target.bn is None:  # a classifier: weight and bias
        return _classifier_state(reader, target)
    why = " (a BN-merged file has a bias on every convolution)" if flavour == "bn_merged" else ""
    layer = reader.layer(target.caffe, "Convolution", (2,) if flavour == "bn_merged" else (1, 2), why)
    weight = reader.tensor(layer, 0, "weight", tuple(conv.weight.shape))
    bias = reader.tensor(layer, 1, "bias", (out,)) if len(layer.blobs) == 2 else torch.zeros(out)
    if flavour == "bn_merged":
        bn = _identity_bn(bias, target.bn.eps)
    else:
        bn = _caffe_bn(reader, target.caffe + BN_SUFFIX, out, bias, caffe_eps, target.bn.eps)
    prefix = target.module
    return {f"{prefix}.conv.weight": weight, **{f"{prefix}.bn.{key}": value for key, value in bn.items()}}


def _classifier_state(reader: _WeightReader, target: ConvTarget) -> dict:
    aux = next((aux for aux in AUX_CLASSIFIERS if aux.caffe == target.caffe), None)
    # A wrong auxiliary shape is most often another class count or another network: say what it is.
    note = "" if aux is None else (f" ({aux.caffe} is the {aux.branch} auxiliary classifier on "
                                   f"{aux.reads[0]}, {target.conv.in_channels} channels, one output per class)")
    layer = reader.layer(target.caffe, "Convolution", (2,))
    conv = target.conv
    return {f"{target.module}.weight": reader.tensor(layer, 0, "weight", tuple(conv.weight.shape), note),
            f"{target.module}.bias": reader.tensor(layer, 1, "bias", (conv.out_channels,), note)}


def _identity_bn(bias: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """A BatchNorm that only adds `bias`: mean 0 and var + eps = 1 (to float32 rounding)."""
    return {"weight": torch.ones_like(bias), "bias": bias, "running_mean": torch.zeros_like(bias),
            "running_var": torch.full_like(bias, 1.0 - eps)}


def _caffe_bn(reader: _WeightReader, name: str, out: int, conv_bias: torch.Tensor, caffe_eps: float,
              our_eps: float) -> dict[str, torch.Tensor]:
    """PSPNet's BN blobs are scale, shift, mean, variance: y = scale * (x - mean) / sqrt(var + eps) + shift.

    A conv bias before it shifts the mean; a different eps shifts the variance (both exact).
    """
    layer = reader.layer(name, "BN", (4,), " (a _bnnomerge file has a BN layer after every convolution)")
    scale, shift, mean, var = (reader.tensor(layer, i, role, (out,))
                               for i, role in enumerate(("scale", "shift", "mean", "variance")))
    if caffe_eps != our_eps:
        var = var + (caffe_eps - our_eps)
    return {"weight": scale, "bias": shift, "running_mean": mean - conv_bias, "running_var": var}


def _fold_input_scale(reader: _WeightReader, targets: list[ConvTarget], state: dict) -> None:
    """conv(s * x) = conv'(x) with the weight's input channels multiplied by s. The Interp between
    data_sub1 and conv1_1_3x3_s2 is linear and zero padding stays zero, so the fold is exact."""
    layer = reader.layer(INPUT_SCALE, "Scale", (1,), " (only a per-channel scale without bias folds exactly)")
    scale = layer.blobs[0].reshape(-1)
    if scale.size not in (1, 3):
        raise CaffeImportError(f"{INPUT_SCALE}: scale blob has shape {layer.blobs[0].shape}, expected (3,) "
                               f"(one factor per input channel) or (1,)")
    factors = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).view(1, -1, 1, 1)
    modules = {target.caffe: target.module for target in targets}
    for caffe_name in INPUT_CONVS:
        key = f"{modules[caffe_name]}.conv.weight"
        state[key] = state[key] * factors


# --- the training net's extra layers ------------------------------------------------------------------
def has_aux_classifiers(by_name: dict[str, CaffeLayer], path: Path) -> bool:
    """True when the file holds both auxiliary classifiers (a training snapshot) and they read our heads'
    features. Our heads come as a pair (ModelConfig.aux_heads), so a lone one is skipped, not imported."""
    present = [aux for aux in AUX_CLASSIFIERS if aux.caffe in by_name and by_name[aux.caffe].blobs]
    if len(present) != len(AUX_CLASSIFIERS):
        return False
    for aux in present:
        _check_aux_input(by_name[aux.caffe], aux, path)
    return True


def _check_aux_input(layer: CaffeLayer, aux: AuxClassifier, path: Path) -> None:
    """A classifier named sub4_out that reads another feature would give a sub4 branch Caffe never had.
    Files that do not record bottoms are taken by name, as Caffe's loader takes them."""
    if layer.bottoms and tuple(layer.bottoms) not in {(name,) for name in aux.reads}:
        raise CaffeImportError(
            f"{path}: {aux.caffe} reads {', '.join(layer.bottoms)}, but icnet_ros's {aux.branch} head "
            f"classifies {aux.reads[0]} (or {aux.reads[1]} before that Interp), as the ICNet training net's {aux.caffe} "
            f"does; this {aux.caffe} belongs to another network")


def unused_weight_layers(by_name: dict[str, CaffeLayer], used: set[str]) -> list[CaffeLayer]:
    return [layer for layer in by_name.values() if layer.blobs and layer.name not in used]


def skipped_layers_warning(skipped: list[CaffeLayer], path: Path) -> str:
    """One message naming every skipped layer with its blob shapes, so that a user can tell a training
    snapshot's leftovers from weights that were meant to be imported."""
    described = ", ".join(f"{layer.name} ({layer.type}, blobs {[blob.shape for blob in layer.blobs]})"
                          for layer in skipped)
    message = (f"{path}: skipped {len(skipped)} layer(s) with weights that icnet_ros's ICNet has no place "
               f"for (Caffe's own loader ignores them too): {described}")
    names = {layer.name for layer in skipped}
    lone = [aux.caffe for aux in AUX_CLASSIFIERS if aux.caffe in names]
    if lone:  # both present are imported, so a skipped one came without its partner
        missing = [aux.caffe for aux in AUX_CLASSIFIERS if aux.caffe not in names]
        message += (f"; the auxiliary classifier {', '.join(lone)} is imported only together with "
                    f"{', '.join(missing)}, which the file lacks, so the checkpoint has the sub124 head only")
    return message


# --- the import --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportedModel:
    model: ICNet
    flavour: str
    provenance: dict
    skipped: tuple[str, ...] = ()  # layers with weights that were not imported (see skipped_layers_warning)


def import_caffemodel(path: str | Path, class_map: str | None = None, prototxt: str | Path | None = None,
                      released_config: str | Path | None = None,
                      warn: Callable[[str], None] | None = None) -> ImportedModel:
    """An ICNet (eval mode) computing what Caffe computes with these weights; raises CaffeImportError.

    Layers with weights that the network has no place for are reported in one message to `warn`
    (default: a logging warning) and skipped."""
    path = Path(path)
    released = load_released_network(released_config)
    class_map = class_map or released.model.get("class_map", ModelConfig.class_map)
    layers, data = read_caffemodel(path)
    by_name = index_layers(layers, path)
    keep_rate = detect_keep_rate(by_name, path)
    num_classes = checked_num_classes(by_name, class_map, path)
    aux_heads = has_aux_classifiers(by_name, path)
    net = parse_prototxt(prototxt) if prototxt is not None else None
    geometry = released.geometry if net is None else prototxt_geometry(Path(prototxt), net, released.bn_eps)
    model = ICNet(_model_config(released, geometry, class_map, num_classes, keep_rate, aux_heads)).eval()
    targets = conv_targets(model)
    if net is not None:
        check_prototxt_convs(net, targets, keep_rate, Path(prototxt))
    flavour = detect_flavour(by_name)
    reader = _WeightReader(by_name, keep_rate, path)
    state = imported_state(reader, targets, flavour, geometry, released.bn_eps)
    skipped = unused_weight_layers(by_name, reader.used)
    if skipped:
        (warn or LOG.warning)(skipped_layers_warning(skipped, path))
    _load_complete_state(model, state)
    provenance = _provenance(path, data, flavour, released, geometry)
    provenance.update(_extra_layers_provenance(aux_heads, skipped))
    return ImportedModel(model, flavour, provenance, tuple(layer.name for layer in skipped))


def _model_config(released: ReleasedNetwork, geometry: Geometry, class_map: str, num_classes: int,
                  keep_rate: float, aux_heads: bool) -> ModelConfig:
    # aux_heads comes from the file, not the YAML: the same released network may come with or without them.
    fields = {**released.model, "class_map": class_map, "num_classes": num_classes, "keep_rate": keep_rate,
              "aux_heads": aux_heads, "input_size": list(geometry.input_size),
              "pyramid_size": list(geometry.pyramid_size),
              "pyramid_windows": [list(window) for window in geometry.pyramid_windows]}
    return config_from_dict(ModelConfig, fields, str(RELEASED_CONFIG))


def _load_complete_state(model: ICNet, state: dict[str, torch.Tensor]) -> None:
    """Every parameter and BN statistic must have come from the file (only the BN step counters do not)."""
    expected = {key for key in model.state_dict() if not key.endswith("num_batches_tracked")}
    if set(state) != expected:  # a mapping bug, not a user error
        raise RuntimeError(f"caffe_import mapped {sorted(set(state) ^ expected)[:5]} wrongly")
    model.load_state_dict(state, strict=False)


def _provenance(path: Path, data: bytes, flavour: str, released: ReleasedNetwork, geometry: Geometry) -> dict:
    md5 = hashlib.md5(data).hexdigest()
    provenance = {"source": path.name, "source_md5": md5, "flavour": flavour,
                  "importer": f"icnet_ros.model.caffe_import/{IMPORTER_VERSION}",
                  "icnet_ros_version": __version__, "geometry_from": geometry.source}
    known = next((entry for entry in released.files if entry.get("md5") == md5), None)
    if known is not None:
        provenance.update({"released_file": known.get("file"), "trained_on": known.get("trained_on"),
                           "released_miou_val": known.get("miou_val")})
    return provenance


def _extra_layers_provenance(aux_heads: bool, skipped: list[CaffeLayer]) -> dict:
    extra = {}
    if aux_heads:
        extra["aux_classifiers"] = {aux.branch: aux.caffe for aux in AUX_CLASSIFIERS}
    if skipped:
        extra["skipped_layers"] = [layer.name for layer in skipped]
    return extra


# --- command line -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icnet-import", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caffemodel", type=Path, help="the authors' released .caffemodel (either flavour)")
    parser.add_argument("--prototxt", type=Path,
                        help="its network definition (optional): input size and pyramid pooling from it, and "
                             "every convolution cross-checked; default: config/import/"
                             "icnet_cityscapes_caffe.yaml")
    parser.add_argument("-o", "--output", type=Path,
                        help="checkpoint to write (default: <caffemodel>.safetensors)")
    parser.add_argument("--class-map",
                        help="class map the weights predict (default: cityscapes, from the YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        imported = import_caffemodel(args.caffemodel, args.class_map, args.prototxt, warn=_print_warning)
        output = args.output or args.caffemodel.with_suffix(".safetensors")
        save_model(output, imported.model, imported.provenance)
    except (CaffeImportError, CheckpointError, ClassMapError, ConfigError, OSError) as error:
        print(f"icnet-import: {error}", file=sys.stderr)
        return 1
    print(import_summary(output, imported))
    return 0


def _print_warning(message: str) -> None:
    """The CLI's warnings go to stderr once, as its errors do (not also through logging)."""
    print(f"icnet-import: warning: {message}", file=sys.stderr)


def import_summary(output: Path, imported: ImportedModel) -> str:
    config, provenance = imported.model.config, imported.provenance
    released = provenance.get("released_file")
    known = f"; the released {released}" if released else "; not a released file icnet-import knows by md5"
    if provenance.get("released_miou_val") is not None:
        known += f", {provenance['released_miou_val']} mIoU on Cityscapes val"
    mean = " ".join(f"{c} {m:g}" for c, m in zip("RGB", config.input_mean))
    height, width = config.input_size
    rate = "1.0" if config.keep_rate == 1.0 else f"{config.keep_rate:g}"
    heads = "sub124 head only" if not config.aux_heads else (
        "sub4, sub24 and sub124 heads (" + ", ".join(aux.caffe for aux in AUX_CLASSIFIERS) + " imported)")
    return "\n".join([
        f"wrote {output}",
        f"  from {provenance['source']} (md5 {provenance['source_md5']}{known})",
        (f"  flavour {imported.flavour} ({FLAVOURS[imported.flavour]}), keep rate {config.keep_rate:g}, "
         f"{config.num_classes} classes ({config.class_map}), {heads}"),
        (f"  input {height}x{width} {config.input_channel_order.upper()}, mean {mean}, frames resized to it "
         f"(geometry from {provenance['geometry_from']})"),
        "next:",
        f"  icnet-evaluate {output} --dataset {config.class_map} --data-root <dataset folder>",
        (f"  ros2 launch icnet_ros segment.launch.py model:={output} dataset:={config.class_map} "
         f"compression:={rate}"),
    ])


if __name__ == "__main__":
    sys.exit(main())
