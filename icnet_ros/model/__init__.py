"""The ICNet network, its loss, BN folding, L1 filter pruning, checkpoints and ONNX export."""
from icnet_ros.model.icnet import BRANCHES, ICNet, InputError, ModelConfig, channel_widths

__all__ = ["BRANCHES", "ICNet", "InputError", "ModelConfig", "channel_widths"]
