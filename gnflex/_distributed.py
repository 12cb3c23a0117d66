"""DTensor sharding rules for gnflex's ops.

GroupNorm normalizes each sample on its own, so a batch-sharded input
(``Shard(0)``) is normalized shard by shard: y, mean and rstd keep
``Shard(0)``, weight and bias are replicated, and the backward's dweight and
dbias are partial sums (``Partial``) over the shards. Fully replicated inputs
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

    def spec(tensor, placement):
        return None if tensor is None else placement

    @register_sharding(torch.ops.gnflex.group_norm.default)
    def group_norm_sharding(input, weight, bias, num_groups, eps=1e-5, activation="none"):
        strategies = []
        for batch in (Shard(0), Replicate()):
            outputs = [batch, batch, batch]  # y, mean, rstd
            inputs = [batch, spec(weight, Replicate()), spec(bias, Replicate()), None, None, None]
            strategies.append((outputs, inputs))
        return strategies

    @register_sharding(torch.ops.gnflex.group_norm_backward.default)
    def group_norm_backward_sharding(grad_out, input, mean, rstd, weight, bias, num_groups, activation,
                                     output_mask):
        params = [spec(weight, Replicate()), spec(bias, Replicate())]
        rest = [None, None, None]  # num_groups, activation, output_mask
        sharded = ([Shard(0), Partial(), Partial()], [Shard(0)] * 4 + params + rest)
        replicated = ([Replicate()] * 3, [Replicate()] * 4 + params + rest)
        return [sharded, replicated]

    _registered.append(True)
