"""Shared test helpers and case lists: devices, per-dtype tolerances and the
independent reference (torch.nn.functional.group_norm + activation, in
float64). Test files import it as ``_helpers`` (pyproject's pytest
``pythonpath`` puts tests/ on the path in every import mode)."""
import pytest
import torch
import torch.nn.functional as F

import gnflex
from gnflex.activations import ACTIVATIONS, torch_function  # noqa: F401  (a case list for the tests)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# (shape, groups) of the forward and backward matrices: no spatial dims, 1D,
# 2D, 3D, odd sizes, multi-chunk groups.
SHAPES = [
    ((4, 6), 3),
    ((2, 12, 17), 4),
    ((2, 32, 9, 11), 8),
    ((2, 16, 3, 5, 7), 4),
    ((3, 3, 5, 5), 1),  # C=3, G=1
    ((2, 6, 4, 4), 3),  # C=6, G=3
    ((1, 8, 70, 70), 2),  # group spans several fixed-size chunks
    ((2, 520, 3, 3), 13),  # wide channels_last rows, C not a multiple of the vector width
]
LAYOUTS = ("contiguous", "channels_last", "strided")
# (layout, shape, groups); an (N, C) input has no channels_last form.
LAYOUT_CASES = [(layout, shape, groups) for layout in LAYOUTS for shape, groups in SHAPES
                if not (layout == "channels_last" and len(shape) < 3)]

# (rtol, atol) of a result in `dtype` against the float64 reference computed
# from the same input values: mostly the rounding of the output to dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not gnflex.built_with_cuda():
        return "gnflex was built without CUDA kernels"
    return None


CUDA_SKIP = _cuda_skip_reason()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))]),
]


def act_ref(z, activation):
    return torch_function(activation)(z)


def reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation="none"):
    """float64 GroupNorm + activation of the given values (autograd-capable)."""
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    # Contiguous: torch's channels_last kernel is less accurate (1e-3 on the
    # large-mean stability case even in float64).
    return act_ref(F.group_norm(x.double().contiguous(), num_groups, w, b, eps), activation)


def assert_close_to_ref(actual, expected, dtype, scale=1.0):
    """`actual` within dtype tolerance of float64 `expected`; `scale` widens
    atol for quantities whose size is not ~1 (gradients summed over groups)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def make_input(shape, dtype, device="cpu", layout="contiguous", seed=0):
    """Random input in the requested memory layout:
    contiguous, channels_last (dense, channel innermost) or strided (non-dense)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        # (N, C, *s) stored as (N, *s, C): works for any rank >= 3.
        perm = [0] + list(range(2, len(shape))) + [1]
        inv = [0, len(shape) - 1] + list(range(1, len(shape) - 1))
        x = x.permute(perm).contiguous().permute(inv)
    elif layout == "strided":
        # Every other element of the last dim: not dense in any layout.
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)
        x = big[..., ::2]
    return x.to(dtype=dtype, device=device)


def make_params(C, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return w, b


def grads_of(fn, x, w, b, dy):
    """(y, dx, dweight, dbias) of y = fn(x, w, b) for grad_out dy (cast to y's
    dtype); None for an absent weight or bias."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype)))
    return (y.detach(), *(None if t is None else next(grads) for t in leaves))


def torch_group_norm_without_bias(num_groups, num_channels, **kwargs):
    """nn.GroupNorm(num_groups, num_channels, bias=False), built as torch does
    it (a weight, bias registered as None) on torch releases whose
    nn.GroupNorm has no `bias` argument (2.11)."""
    norm = torch.nn.GroupNorm(num_groups, num_channels, **kwargs)
    norm.register_parameter("bias", None)
    return norm


def randomize_groupnorms(model):
    """Every GroupNorm's affine parameters away from 1 / 0 (weight in [0.5, 1.5],
    bias ~ N(0, 0.1)), so conversions that lose them show; returns the model."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
    return model
