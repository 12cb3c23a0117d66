"""Pieces both benchmarks share: geomeans per category, saved-tensor bytes and the result files."""
import json
import math

import torch


def geomean(values):
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def make_inputs(shape, dtype, layout, device="cpu", requires_grad=False):
    """One bench case's x (NCHW or channels_last), weight, bias and grad_out."""
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    w = torch.rand(shape[1], dtype=dtype, device=device) + 0.5
    b = torch.randn(shape[1], dtype=dtype, device=device)
    dy = torch.randn_like(x)
    if requires_grad:
        for t in (x, w, b):
            t.requires_grad_()
    return x, w, b, dy


# The activation field of the rows that modulate per sample (AdaGN:
# act(GN(x) * (1 + scale) + shift), with SiLU).
MODULATED = "adagn+silu"


def make_modulation(x, requires_grad=False):
    """Per-sample (N, C) scale and shift for the MODULATED rows."""
    scale = 0.5 * torch.randn(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    shift = torch.randn_like(scale)
    if requires_grad:
        scale.requires_grad_()
        shift.requires_grad_()
    return scale, shift


def native_group_norm(groups, activation):
    """The baseline: torch's GroupNorm, then F.silu when the case fuses SiLU;
    for MODULATED rows, fn(x, w, b, scale, shift) of diffusers' eager
    composition."""
    import torch.nn.functional as F

    def native(x, w, b):
        y = F.group_norm(x, groups, w, b)
        return F.silu(y) if activation == "silu" else y

    def modulated(x, w, b, scale, shift):
        per_value = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
        y = F.group_norm(x, groups, w, b) * (1 + scale.view(per_value)) + shift.view(per_value)
        return F.silu(y)

    return modulated if activation == MODULATED else native


def saved_tensor_bytes(forward):
    """Bytes of the tensors autograd saves for the backward while running forward()."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def summarize(rows, keys, ratio_fields):
    """Geomean of each ratio field per combination of `keys` values."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [
        {**dict(zip(keys, key)),
         **{f: geomean([r[f] for r in members if f in r]) for f in ratio_fields}}
        for key, members in groups.items()
    ]


def markdown_table(records, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = [("" if r[c] != r[c] else f"{r[c]:.3f}") if isinstance(r.get(c), float) else str(r.get(c, ""))
                 for c in columns]  # nan (no value for this row) -> empty cell
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_and_save(lines, md_path=None):
    """Prints a report's lines and writes them to md_path when given."""
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


def write_results(args, title, machine, notes, rows, summary, row_columns, summary_columns, extra_tables=()):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows, "summary": summary,
                       **{heading: records for heading, records, _ in extra_tables}}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# {title}\n\nMachine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n\n")
            f.write(notes + "\n\n## Geomean per category\n\n")
            f.write(markdown_table(summary, summary_columns))
            for heading, records, columns in extra_tables:
                f.write(f"\n## {heading}\n\n")
                f.write(markdown_table(records, columns))
            f.write("\n## All cases\n\n")
            f.write(markdown_table(rows, row_columns))
