"""ICNet: the released layer table, any input size, branches, loss, BN folding, pruning, MACs."""
import pytest
import torch

from conftest import trained_bn_model
from icnet_ros.model import BRANCHES, ICNet, InputError, ModelConfig
from icnet_ros.model.fold import fold_batchnorm
from icnet_ros.model.icnet import BranchSizes
from icnet_ros.model.loss import CascadeLoss
from icnet_ros.model.prune import channel_groups, progressive_schedule, prune_model
from icnet_ros.model.summary import branch_macs, parameter_counts


def test_parameter_count_matches_released_network():
    with torch.device("meta"):
        counts = parameter_counts(ICNet(ModelConfig(keep_rate=0.5, num_classes=19)))
    # The released prototxt: conv weights + classifier bias 6,671,443 and BN scale/shift 28,544.
    assert counts["inference"] == 6_699_987
    assert counts["batchnorm"] == 28_544


@pytest.mark.parametrize("keep_rate", [1.0, 0.75, 0.5, 0.25, 0.125])
def test_keep_rates_that_give_whole_channels_build(keep_rate):
    with torch.device("meta"):
        model = ICNet(ModelConfig(keep_rate=keep_rate))
    assert model.stem[0].conv.out_channels == round(64 * keep_rate)


@pytest.mark.parametrize("keep_rate", [0.3, 0.0, 1.5])
def test_keep_rates_without_whole_channels_are_rejected(keep_rate):
    with pytest.raises(ValueError, match="keep_rate"):
        ModelConfig(keep_rate=keep_rate)


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (96, 320), (375, 1242)])
def test_inference_returns_full_resolution_logits_for_any_size(size):
    model = ICNet(ModelConfig(keep_rate=0.25, num_classes=7)).eval()
    with torch.no_grad():
        for branch in BRANCHES:
            assert model(torch.randn(1, 3, *size), branch).shape == (1, 7, *size)


def test_training_returns_three_branches_at_their_resolutions():
    model = ICNet(ModelConfig(keep_rate=0.25, num_classes=4)).train()
    out = model(torch.randn(2, 3, 256, 512))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "sub4": (2, 4, 16, 32), "sub24": (2, 4, 32, 64), "sub124": (2, 4, 64, 128)}
    sizes = BranchSizes.for_input(1025, 2049)
    assert (sizes.sub2, sizes.sub1, sizes.sub124) == ((65, 129), (129, 257), (258, 514))


def _modules_run(model, branch):
    ran = set()
    watched = {"sub1": model.sub1, "cff_24": model.cff_24, "cff_124": model.cff_124,
               "classifier": model.classifier, "stage5": model.stage5}
    hooks = [m.register_forward_hook(lambda *_, n=n: ran.add(n)) for n, m in watched.items()]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96), branch)
    for hook in hooks:
        hook.remove()
    return ran


def test_early_exit_branches_skip_the_higher_resolution_work():
    model = ICNet(ModelConfig(keep_rate=0.25)).eval()
    assert _modules_run(model, "sub4") == {"stage5"}
    assert _modules_run(model, "sub24") == {"stage5", "cff_24"}
    assert _modules_run(model, "sub124") == {"stage5", "cff_24", "sub1", "cff_124", "classifier"}


@pytest.mark.parametrize("bad, message", [
    (torch.randn(1, 4, 64, 64), "3 color channels"),
    (torch.randn(3, 64, 64), r"\(N, 3, H, W\)"),
    (torch.randn(1, 3, 31, 400), "at least 32x32"),
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
])
def test_bad_input_gets_a_clear_error(bad, message):
    model = ICNet(ModelConfig(keep_rate=0.25)).eval()
    with pytest.raises(InputError, match=message):
        model(bad)


def test_unknown_branch_lists_the_allowed_ones():
    model = ICNet(ModelConfig(keep_rate=0.25)).eval()
    with pytest.raises(ValueError, match="sub124"):
        model(torch.randn(1, 3, 64, 64), "sub8")


def test_cascade_loss_weights_and_ignore_index():
    model = ICNet(ModelConfig(keep_rate=0.25, num_classes=3)).train()
    logits = model(torch.randn(2, 3, 64, 64))
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :32] = 255
    total, per_branch = CascadeLoss()(logits, labels)
    assert torch.isclose(total, 0.4 * per_branch["sub4"] + 0.4 * per_branch["sub24"] + per_branch["sub124"])
    total.backward()
    assert model.cff_24.aux_classifier.weight.grad.abs().sum() > 0  # the guidance reaches the aux heads
    only_labelled = CascadeLoss()(logits, labels.masked_fill(labels == 255, 0))[0]
    assert not torch.isclose(total, only_labelled)  # ignored pixels are left out of the loss


@pytest.mark.parametrize("branch", BRANCHES)
def test_batchnorm_folding_matches_eval_model(branch):
    model = trained_bn_model(keep_rate=0.25)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    image = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        assert (model(image, branch) - folded(image, branch)).abs().max() < 1e-4


def _embed(small: ICNet, large: ICNet) -> None:
    """Copy `small`'s weights into the leading channels of `large`; all other channels output zero."""
    large_state = large.state_dict()
    for name, tensor in small.state_dict().items():
        target = large_state[name]
        if target.dim() == 0:
            continue
        target.zero_() if not name.endswith("running_var") else target.fill_(1.0)
        target[tuple(slice(0, s) for s in tensor.shape)] = tensor


def test_pruning_respects_residual_groups_and_loads_into_smaller_model():
    # A keep-1.0 model that computes exactly what a keep-0.5 model computes (its extra filters are
    # zero, so L1 ranks them last): pruning must recover the keep-0.5 weights and outputs exactly.
    small = trained_bn_model(keep_rate=0.25)
    large = ICNet(ModelConfig(keep_rate=0.5, num_classes=5, class_map="camvid")).eval()
    _embed(small, large)
    image = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        assert (large(image) - small(image)).abs().max() < 1e-4
        pruned = prune_model(large, 0.25)
        assert pruned.config.keep_rate == 0.25
        assert (pruned(image) - small(image)).abs().max() < 1e-4
    fresh = ICNet(ModelConfig(keep_rate=0.25, num_classes=5, class_map="camvid"))
    fresh.load_state_dict(pruned.state_dict(), strict=True)


def test_every_conv_channel_is_in_exactly_one_group():
    model = ICNet(ModelConfig(keep_rate=0.25))
    produced = [p for g in channel_groups(model) for p in g.producers]
    convbns = [n for n, m in model.named_modules() if type(m).__name__ == "ConvBN"]
    assert sorted(produced) == sorted(convbns)


def test_pruning_keeps_the_filters_with_largest_l1_norm():
    model = ICNet(ModelConfig(keep_rate=0.5)).eval()
    pruned = prune_model(model, 0.25)
    weight = model.stem[0].conv.weight
    top = weight.abs().flatten(1).sum(1).topk(16).indices.sort().values
    assert torch.equal(pruned.stem[0].conv.weight, weight[top])


def test_progressive_schedule():
    assert progressive_schedule(1.0, 0.5) == [0.75, 0.5]
    assert progressive_schedule(1.0, 0.25) == [0.75, 0.5, 0.25]
    assert progressive_schedule(0.5, 0.5) == []
    with pytest.raises(ValueError):
        progressive_schedule(0.5, 0.75)


def test_macs_match_the_released_network_at_1025x2049():
    macs = branch_macs(ModelConfig(keep_rate=0.5), 1025, 2049)
    assert abs(macs["sub124"] / 1e9 - 29.8) < 0.1  # counted from the layer table in PERF_NOTES
    assert macs["sub4"] < macs["sub24"] < macs["sub124"]
