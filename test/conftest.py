"""Shared fixtures. Tests are CPU-only, seeded, and use tiny inputs unless marked slow."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def trained_bn_model(keep_rate=0.25, num_classes=5, class_map="camvid"):
    """A small ICNet whose BatchNorm statistics are not the identity (as after training)."""
    from icnet_ros.model import ICNet, ModelConfig

    model = ICNet(ModelConfig(keep_rate=keep_rate, num_classes=num_classes, class_map=class_map))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 96, 128))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """test_launch_segment.py needs launch_testing's pytest plugin (it starts the launch); without the
    plugin (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1, or pytest >= 9, where it cannot load) its test cases would
    run with no launch: skip them with the reason. `launch_test` runs the file (add_launch_test in CMake)."""
    if config.pluginmanager.has_plugin("launch_testing"):
        return
    skip = pytest.mark.skip(reason="a launch test: run it with `launch_test` (launch_testing's pytest plugin "
                                   "is not loaded)")
    for item in items:
        if item.path.name == "test_launch_segment.py":
            item.add_marker(skip)
