"""Backbones: output shapes, build_backbone, feature_dim, gradients, serialisation."""
import io

import pytest
import torch
from torch import nn

from conftest import token_model
from pymeta.nn import BACKBONES, Conv4, ResNet12, build_backbone, feature_dim

SMALL_RESNET = dict(channels=(4, 8, 8, 16))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add sync overhead (badly so on a shared machine);
    conftest restores the thread count after each test."""
    torch.set_num_threads(1)


def _out(net: nn.Module, shape, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return net(torch.randn(batch, *shape))


@pytest.mark.parametrize("shape, flat, maps", [
    ((1, 28, 28), 64, (64, 1, 1)),
    ((3, 84, 84), 1600, (64, 5, 5)),
])
def test_conv4_shapes(shape, flat, maps):
    for flatten, expected in ((True, (flat,)), (False, maps)):
        net = Conv4(in_channels=shape[0], flatten=flatten)
        assert _out(net, shape).shape == (2, *expected)
        assert net.output_shape(shape) == expected
        assert net.out_features(shape) == flat


def test_conv4_options_and_structure():
    net = Conv4(in_channels=1, hidden=8, out_channels=16, pool_last=False)
    assert _out(net, (1, 28, 28)).shape == (2, 16 * 3 * 3) and net.out_features((1, 28, 28)) == 144
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1)), (8, 8, (3, 3), (1, 1)),
        (8, 16, (3, 3), (1, 1))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3


@pytest.mark.parametrize("shape", [(3, 84, 84), (1, 28, 28)])
def test_resnet12_shapes(shape):
    for flatten, expected in ((True, (16,)), (False, (16, shape[1] // 16, shape[2] // 16))):
        net = ResNet12(in_channels=shape[0], flatten=flatten, **SMALL_RESNET)
        assert _out(net, shape).shape == (2, *expected)
        assert net.output_shape(shape) == expected


def test_resnet12_default_width():
    net = ResNet12(in_channels=1)
    assert net.out_features((1, 84, 84)) == 640
    assert ResNet12(flatten=False).output_shape((3, 84, 84)) == (640, 5, 5)
    with torch.no_grad():
        assert _out(net, (1, 28, 28), batch=1).shape == (1, 640)
    blocks = list(net.blocks)
    assert len(blocks) == 4 and all(len(b.convs) == 3 for b in blocks)
    assert [b.shortcut[0].kernel_size for b in blocks] == [(1, 1)] * 4


def test_resnet12_dropout_only_in_training():
    net = ResNet12(in_channels=1, drop_rate=0.5, **SMALL_RESNET)
    x = torch.randn(2, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.equal(a, net(x))


@pytest.mark.parametrize("net", [Conv4(hidden=4, out_channels=4),
                                 ResNet12(in_channels=1, **SMALL_RESNET)])
def test_gradients_reach_every_parameter(net):
    _out(net, (1, 28, 28)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs():
    net = Conv4(in_channels=3)
    with pytest.raises(ValueError, match=r"expected input \[B, 3, H, W\]"):
        net(torch.randn(3, 28, 28))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="too small"):
        net.out_features((3, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        net.out_features((1, 28, 28))
    with pytest.raises(ValueError, match="4 entries"):
        ResNet12(channels=(8, 8))
    with pytest.raises(ValueError, match=r"Conv4: input \(12, 12\) is too small for 4 2x2"):
        net(torch.randn(2, 3, 12, 12))  # torch's own error comes from deep in max_pool2d
    assert Conv4(pool_last=False)(torch.randn(2, 1, 8, 8)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"ResNet12: input \(8, 8\) is too small"):
        ResNet12(in_channels=1, **SMALL_RESNET)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"drop_rate must be a probability in \[0, 1\)"):
        ResNet12(drop_rate=1.0)
    with pytest.raises(ValueError, match="flatten must be True or False"):
        Conv4(flatten="no")


def test_build_backbone():
    assert set(BACKBONES) == {"conv4", "resnet12", "mlp"}
    net = build_backbone("conv4", in_channels=3, hidden=8, flatten=False)
    assert isinstance(net, Conv4) and not net.flatten and net.in_channels == 3
    assert isinstance(build_backbone("resnet12", **SMALL_RESNET), ResNet12)
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*'conv4', 'mlp', 'resnet12'"):
        build_backbone("vgg")


def test_mlp_is_the_plain_perceptron():
    torch.manual_seed(0)
    net = build_backbone("mlp", in_features=3, hidden=(5, 6), out_features=2, activation="tanh")
    assert type(net) is torch.nn.Sequential   # a plain Sequential: batched by the learners
    x = torch.randn(4, 3)
    l0, l1, l2 = (m for m in net if isinstance(m, torch.nn.Linear))
    ref = l2(torch.tanh(l1(torch.tanh(l0(x)))))
    torch.testing.assert_close(net(x), ref)
    net = build_backbone("mlp", hidden=(4000,), init_std=0.01)
    w = net[0].weight
    assert w.abs().max() <= 0.02 and abs(w.std() - 0.0088) < 0.0005 and not net[0].bias.any()
    for bad, message in ((dict(hidden=(0,)), "positive ints"), (dict(activation="x"), "one of"),
                         (dict(init_std=0.0), "init_std must be a positive float, got 0.0"),
                         (dict(init_std="0.01"), "init_std must be a positive float")):
        with pytest.raises(ValueError, match=message):
            build_backbone("mlp", **bad)


def test_feature_dim():
    assert feature_dim(Conv4(in_channels=3), (3, 84, 84)) == 1600
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()).double()
    stats = net[1].running_mean.clone()
    assert feature_dim(net, (1, 5, 5)) == 18
    assert net.training and torch.equal(net[1].running_mean, stats)  # a clean dry run
    assert feature_dim(nn.Flatten(), (3, 2, 2)) == 12                # no parameters at all
    net[1].eval()  # a frozen BatchNorm stays frozen
    assert feature_dim(net, (1, 5, 5)) == 18 and net.training and not net[1].training
    assert feature_dim(token_model(4), (7,), dtype=torch.int64) == 4  # token ids, not floats


def test_autocast_bfloat16_on_cpu():
    net = Conv4(hidden=4, out_channels=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = _out(net, (1, 28, 28))
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()


def test_save_and_state_dict_round_trip():
    net = ResNet12(in_channels=1, **SMALL_RESNET).eval()
    x = torch.randn(2, 1, 28, 28)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), net(x))
    fresh = ResNet12(in_channels=1, **SMALL_RESNET).eval()
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh(x), net(x))

