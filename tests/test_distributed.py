"""DTensor sharding rules, FSDP2 (fully_shard) and DDP with gnflex's layers,
on 2 gloo processes; each against one process on the whole batch."""
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import gnflex

WORLD = 2


def _run(tmp_path, worker, *args):
    """Runs worker(rank, ...) in WORLD gloo processes; returns rank 0's result."""
    result = tmp_path / "result.pt"
    mp.spawn(_init_and_run, args=(str(tmp_path / "store"), worker, args, str(result)), nprocs=WORLD, join=True)
    return torch.load(result)


def _init_and_run(rank, store_path, worker, args, result_path):
    import torch.distributed as dist

    # A file store, not a TCP port picked in advance: no port another process can take first.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        result = worker(rank, *args)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


# (input placement, what the op's outputs and dx come back as): a channel- or
# space-sharded input is redistributed by DTensor (to replicated).
PLACEMENTS = [("shard0", "shard0"), ("replicate", "replicate"), ("shard1", "replicate"), ("shard2", "replicate")]


def _dtensor_worker(rank, x, w, b, g, groups, activation, use_module):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    named = {"shard0": Shard(0), "shard1": Shard(1), "shard2": Shard(2), "replicate": Replicate()}
    results = {}
    for placement, _ in PLACEMENTS:
        dx = distribute_tensor(x, mesh, [named[placement]]).requires_grad_()
        params = [distribute_tensor(p, mesh, [Replicate()]).requires_grad_() for p in (w, b)]
        if use_module:
            norm = gnflex.GroupNormFlex(x.shape[1], groups=groups, activation=activation)
            norm.weight, norm.bias = (nn.Parameter(p) for p in params)
            params = [norm.weight, norm.bias]
            y = norm(dx)
        else:
            y = gnflex.group_norm(dx, groups, *params, activation=activation)
        (y * distribute_tensor(g, mesh, [named[placement]])).sum().backward()
        kinds = {Shard(0): "shard0", Replicate(): "replicate", Partial(): "partial"}
        results[placement] = {
            "placements": [kinds.get(t.placements[0], str(t.placements[0])) for t in (y, dx.grad, params[0].grad)],
            "values": [t.full_tensor() for t in (y, dx.grad, params[0].grad, params[1].grad)],
        }
    return results


@pytest.mark.slow
@pytest.mark.parametrize("use_module", (False, True), ids=("functional", "module"))
def test_dtensor_matches_one_process(tmp_path, use_module):
    torch.manual_seed(0)
    # N = 3: uneven batch shards.
    x, g = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    results = _run(tmp_path, _dtensor_worker, x, w, b, g, 4, "silu", use_module)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = F.silu(F.group_norm(xr, 4, wr, br))
    (ref * g).sum().backward()
    for placement, comes_back_as in PLACEMENTS:
        got = results[placement]
        param_grad = "partial" if comes_back_as == "shard0" else "replicate"
        assert got["placements"] == [comes_back_as, comes_back_as, param_grad], placement
        for ours, theirs in zip(got["values"], (ref, xr.grad, wr.grad, br.grad)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m: f"{placement}: {m}")


def _modulated_worker(rank, x, w, b, scale, shift, g, groups):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    dx, dscale, dshift, dg = (distribute_tensor(t, mesh, [Shard(0)]) for t in (x, scale, shift, g))
    dw, db = (distribute_tensor(t, mesh, [Replicate()]) for t in (w, b))
    leaves = [t.requires_grad_() for t in (dx, dw, db, dscale, dshift)]
    y = gnflex.modulated_group_norm(dx, groups, dscale, dshift, dw, db, activation="silu")
    (y * dg).sum().backward()
    return {"y_placement": str(y.placements[0]),
            "values": [t.full_tensor() for t in (y, *(leaf.grad for leaf in leaves))]}


@pytest.mark.slow
def test_dtensor_modulated_batch_sharded(tmp_path):
    """AdaGN with x, scale and shift batch-sharded: per-sample weight and bias
    follow the batch; output and every gradient equal one process's."""
    torch.manual_seed(0)
    x, g = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    scale, shift = 0.5 * torch.randn(4, 8), torch.randn(4, 8)
    got = _run(tmp_path, _modulated_worker, x, w, b, scale, shift, g, 4)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scale, shift)]
    xr, wr, br, sr, tr = leaves
    ref = F.silu(F.group_norm(xr, 4, wr, br) * (1 + sr[:, :, None, None]) + tr[:, :, None, None])
    (ref * g).sum().backward()
    assert got["y_placement"] == "S(0)"
    for ours, theirs in zip(got["values"], (ref, *(leaf.grad for leaf in leaves))):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _fsdp_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), gnflex.GroupNormFlex(16, groups=4, activation="silu"),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), gnflex.GroupNorm(8, 16, activation="relu"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _fsdp_worker(rank, inputs, targets):
    from torch.distributed.fsdp import fully_shard

    model = _fsdp_model()
    for layer in (model[0], model[1], model[2], model[3]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = inputs.shape[1] // WORLD
    for step in range(inputs.shape[0]):
        opt.zero_grad()
        local = slice(rank * shard, (rank + 1) * shard)
        F.cross_entropy(model(inputs[step, local]), targets[step, local]).backward()
        opt.step()
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


@pytest.mark.slow
def test_fsdp2_training_matches_one_process(tmp_path):
    torch.manual_seed(0)
    steps, batch = 3, 8
    inputs, targets = torch.randn(steps, batch, 3, 8, 8), torch.randint(0, 5, (steps, batch))
    trained = _run(tmp_path, _fsdp_worker, inputs, targets)

    model = _fsdp_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(inputs[step]), targets[step]).backward()
        opt.step()
    assert trained.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert not torch.equal(value, init[name]), f"{name} did not train"
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _ddp_model():
    # 64x64 inputs keep P5 at 2x2, and two channels per group keep every
    # layer's output non-constant, so every parameter gets a gradient.
    return gnflex.GNCNN(widths=(8, 16, 16, 16), config=gnflex.GNConfig(min_channels_per_group=2))


def _ddp_worker(rank, init_state, inputs, targets):
    from torch.nn.parallel import DistributedDataParallel

    model = _ddp_model()
    model.load_state_dict(init_state)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    shard = inputs.shape[1] // WORLD  # inputs: (steps, global batch, ...)
    for step in range(inputs.shape[0]):
        opt.zero_grad()
        batch = slice(rank * shard, (rank + 1) * shard)
        F.cross_entropy(ddp(inputs[step, batch]), targets[step, batch]).backward()
        opt.step()
    return model.state_dict()


def test_ddp_matches_one_process(tmp_path):
    torch.manual_seed(0)
    steps, global_batch = 3, 8
    init = {k: v.clone() for k, v in _ddp_model().state_dict().items()}
    inputs = torch.randn(steps, global_batch, 3, 64, 64)
    targets = torch.randint(0, 10, (steps, global_batch))
    ddp_state = _run(tmp_path, _ddp_worker, init, inputs, targets)

    single = _ddp_model()
    single.load_state_dict(init)
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(single(inputs[step]), targets[step]).backward()
        opt.step()
    for name, value in single.state_dict().items():
        assert not torch.equal(value, init[name]), f"{name} did not train"
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
