"""Autocast policy, model conversion and DDP."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnflex
from conftest import CUDA_SKIP, make_input
from gnflex import GNCNN, GroupNormFlex


# ---- autocast -------------------------------------------------------------------
@pytest.mark.parametrize("input_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpu_autocast_matches_torch_policy(input_dtype):
    x = make_input((2, 16, 6, 6), input_dtype)
    norm = GroupNormFlex(16, groups=4)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    ref = nn.GroupNorm(4, 16)
    ref.load_state_dict(norm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = norm(x), ref(x)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1.6e-2, atol=1.6e-2)


def test_cpu_autocast_conv_block_trains():
    block = gnflex.ConvGNAct(3, 16, activation="silu")
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16  # conv runs in bf16, GN keeps its input dtype (as torch's)
    y.float().sum().backward()
    assert block.norm.weight.grad.dtype == torch.float32 and torch.isfinite(block.norm.weight.grad).all()


def test_autocast_kernel_registered_for_cuda():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gnflex::group_norm", "AutocastCUDA")


@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_cuda_autocast_matches_torch_policy(dtype):
    x = make_input((2, 16, 6, 6), torch.float32, "cuda")
    norm = GroupNormFlex(16, groups=4, device="cuda")
    ref = nn.GroupNorm(4, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h = x.to(dtype)
        ours, theirs = norm(h), ref(h)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- conversion ------------------------------------------------------------------
def test_convert_torchvision_resnet18_groupnorm():
    torchvision = pytest.importorskip("torchvision", reason="torchvision is a test dependency")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(32, c)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    n_gn = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    converted, report = gnflex.convert(model)
    assert len(report.replaced) == n_gn == 20
    assert not any(isinstance(m, nn.GroupNorm) for m in converted.modules())
    torch.testing.assert_close(converted(x), before, rtol=1e-4, atol=1e-4)


class MyGroupNorm(nn.GroupNorm):
    pass


def test_convert_fuses_activation_and_keeps_attributes():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8, eps=1e-3), nn.SiLU(),
        nn.Conv2d(8, 8, 1), MyGroupNorm(2, 8, affine=False), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 1), nn.GroupNorm(8, 8, bias=False), nn.GELU(approximate="tanh"),
    ).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[7].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = model(x)
    keys = set(model.state_dict())
    converted, report = gnflex.convert(model)
    assert [name for name, _, _ in report.replaced] == ["1", "4", "7"]
    assert report.fused == ["2", "5"]  # tanh-GELU is not ours: left alone
    assert isinstance(converted[2], nn.Identity) and isinstance(converted[8], nn.GELU)
    assert (converted[1].activation, converted[1].eps, converted[1].num_groups) == ("silu", 1e-3, 4)
    assert converted[4].weight is None and converted[4].activation == "relu"
    assert converted[7].bias is None and converted[7].weight.dtype == torch.float64
    assert set(converted.state_dict()) == keys
    torch.testing.assert_close(converted(x), before)
    assert "3 module(s) replaced, 2 activation(s) fused" in str(report)


def test_convert_without_fusion_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.GroupNorm(4, 16), nn.ReLU())
    converted, report = gnflex.convert(model, fuse_activations=False, batchnorm=True)
    assert isinstance(converted[1], GroupNormFlex) and converted[1].num_groups == 16  # auto groups
    assert isinstance(converted[2], nn.ReLU) and converted[3].activation == "none"
    assert report.fused == [] and len(report.replaced) == 2
    untouched, report = gnflex.convert(nn.Sequential(nn.BatchNorm2d(4)))
    assert isinstance(untouched[0], nn.BatchNorm2d) and report.replaced == []


# ---- DDP -------------------------------------------------------------------------
def _ddp_worker(rank, world_size, port, init_state, inputs, targets, steps, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = _ddp_model()
        model.load_state_dict(init_state)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        shard = inputs.shape[1] // world_size  # inputs: (steps, global batch, ...)
        for step in range(steps):
            x = inputs[step, rank * shard:(rank + 1) * shard]
            y = targets[step, rank * shard:(rank + 1) * shard]
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        if rank == 0:
            torch.save(model.state_dict(), result_path)
    finally:
        dist.destroy_process_group()


def _ddp_model():
    # 64x64 inputs keep P5 at 2x2, and two channels per group keep every
    # layer's output non-constant, so every parameter gets a gradient.
    return GNCNN(widths=(8, 16, 16, 16), config=gnflex.GNConfig(min_channels_per_group=2))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    steps, global_batch = 3, 8
    init = {k: v.clone() for k, v in _ddp_model().state_dict().items()}
    inputs = torch.randn(steps, global_batch, 3, 64, 64)
    targets = torch.randint(0, 10, (steps, global_batch))
    result = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), init, inputs, targets, steps, str(result)), nprocs=2,
             join=True)

    single = _ddp_model()
    single.load_state_dict(init)
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(single(inputs[step]), targets[step]).backward()
        opt.step()
    ddp_state = torch.load(result)
    for name, value in single.state_dict().items():
        assert not torch.equal(value, init[name]), f"{name} did not train"
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
