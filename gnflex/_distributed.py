"""DTensor sharding rules for gnflex's ops.

GroupNorm normalizes each sample on its own, so a batch-sharded input
(``Shard(0)``) is normalized shard by shard: y, mean and rstd keep
``Shard(0)``, per-channel weight and bias are replicated (per-sample ones,
(N, C), are sharded with the batch), and the backward's dweight and dbias are
partial sums (``Partial``) over the shards (per-sample ones keep ``Shard(0)``). Fully replicated inputs
give replicated outputs. Any other placement (a channel- or space-sharded
input) is redistributed by DTensor to one of these before the op runs.

Importing torch.distributed.tensor takes about half a second, so gnflex does
not: the rules are registered by the first call of gnflex's Python API that
sees a tensor subclass while torch.distributed.tensor is loaded, or by
:func:`register_sharding_rules`.
"""
import sys

_registered = []


def register_if_loaded() -> None:
    if not _registered and "torch.distributed.tensor" in sys.modules:
        register_sharding_rules()


def register_sharding_rules() -> None:
    """Registers the rules for ``torch.ops.gnflex.group_norm`` and
    ``group_norm_backward`` (once)."""
    if _registered:
        return
    import torch
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def per_sample(param):
        return len(param.shape) == 2

    def param_spec(param, batch):
        if param is None:
            return None
        return batch if per_sample(param) else Replicate()

    def grad_spec(param, batch):
        if param is not None and per_sample(param):
            return batch
        return Partial() if batch == Shard(0) else Replicate()

    @register_sharding(torch.ops.gnflex.group_norm.default)
    def group_norm_sharding(input, weight, bias, num_groups, eps=1e-5, activation="none"):
        strategies = []
        for batch in (Shard(0), Replicate()):
            outputs = [batch, batch, batch]  # y, mean, rstd
            inputs = [batch, param_spec(weight, batch), param_spec(bias, batch), None, None, None]
            strategies.append((outputs, inputs))
        return strategies

    @register_sharding(torch.ops.gnflex.group_norm_backward.default)
    def group_norm_backward_sharding(grad_out, input, mean, rstd, weight, bias, num_groups, activation,
                                     output_mask):
        rest = [None, None, None]  # num_groups, activation, output_mask
        strategies = []
        for batch in (Shard(0), Replicate()):
            outputs = [batch, grad_spec(weight, batch), grad_spec(bias, batch)]
            inputs = [batch] * 4 + [param_spec(weight, batch), param_spec(bias, batch)] + rest
            strategies.append((outputs, inputs))
        return strategies

    _registered.append(True)
