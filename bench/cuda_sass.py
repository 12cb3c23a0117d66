"""Cost of the CUDA kernels read from their compiled code, without a GPU.

Compiles csrc/cuda/group_norm_cuda.cu for one architecture (default sm_90) with
the build's own nvcc flags, disassembles it (cuobjdump / nvdisasm from the
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, or the toolkit's), and
prints one line per kernel instantiation:

    sass <kernel> regs <n> spills <bytes> smem <bytes> loop_instr_per_value <x> load_bytes <n>

loop_instr_per_value: SASS instructions of the kernel's main loop per element it
consumes (per position: x, or x and dy); load_bytes: the widest global load in
that loop. The main loop is the loop (a backward branch) with the widest global
load, the shortest such loop where several have it. Kernels without a loop over
values (the per-group merges) print "-". Then the budgets of the design
(docs/design.md): <= 8 instructions per 16-bit value and <= 12 per fp32 value in
statistics and output loops, <= 64 registers, no spills, 16-byte loads where
aligned; every kernel over a budget is listed, and --check makes that an error.

    python bench/cuda_sass.py [--arch 90] [--check] [--md FILE]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "sass")

REG_BUDGET = 64
# Instructions per consumed value, by the width of the scalar type.
INSTR_BUDGET = {2: 8.0, 4: 12.0}
SCALARS = {"c10::Half": ("half", 2), "c10::BFloat16": ("bf16", 2), "float": ("fp32", 4), "double": ("fp64", 8)}
ACTIVATIONS = {"0": "none", "1": "relu", "2": "silu", "3": "gelu"}


def tool(name):
    """Path of cuobjdump / nvdisasm: the wheel's (nvidia.cu13 / nvidia.cuda_*), the toolkit's or PATH's."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for base in nvidia.__path__:
            for sub in ("cu13/bin", "cuda_cuobjdump/bin", "cuda_nvdisasm/bin"):
                path = os.path.join(base, sub, name)
                if os.path.exists(path):
                    return path
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(cuda_home, "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def nvcc_command(arch, out):
    import torch.utils.cpp_extension as ext

    sys.path.insert(0, os.path.join(ROOT, "gnflex"))
    import _sources  # the build's flag lists (plain module, no gnflex import)

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [f"-I{p}" for p in ext.include_paths(device_type="cuda")]
    return ([os.path.join(cuda_home, "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3",
             *_sources.NVCC_FLAGS, *ext.COMMON_NVCC_FLAGS, "-std=c++20", "-DGNFLEX_PYTHON_MODULE",
             "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
             "-o", out, os.path.join(ROOT, "csrc", "cuda", "group_norm_cuda.cu")])


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_name(demangled):
    """gnflex::cuda::apply_cl_kernel<ForwardOp<(Activation)2>, 8, c10::Half, float>(...) ->
    apply_cl_kernel<ForwardOp<silu>,8,half,float>"""
    name = re.sub(r"\(gnflex::Activation\)(\d)", lambda m: ACTIVATIONS[m.group(1)], demangled)
    name = name.removeprefix("void ").split("(", 1)[0]
    name = name.replace("gnflex::cuda::", "").replace("gnflex::", "").replace(" ", "")
    for full, (short, _) in SCALARS.items():
        name = name.replace(full, short)
    return name


def value_info(demangled):
    """(bytes of the kernel's scalar_t, values read per position) or None for kernels
    without a value type (the first floating template argument is scalar_t)."""
    args = re.sub(r"\(gnflex::Activation\)", "", demangled).split("(", 1)[0]
    hits = [(args.find(full), size) for full, (_, size) in SCALARS.items() if args.find(full) >= 0]
    if not hits or "finalize" in args:
        return None
    reads_dy = "grad_sums" in args or "InputGradOp" in args
    return min(hits)[1], 2 if reads_dy else 1


def parse_sass(text):
    """{mangled name: [(address, instruction text)]} and labels per function."""
    functions, labels = {}, {}
    current = None
    pending = []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            functions[current], labels[current] = [], {}
            pending = []
            continue
        if current is None:
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            address = int(m.group(1), 16)
            for label in pending:
                labels[current][label] = address
            pending = []
            functions[current].append((address, m.group(2).strip()))
    return functions, labels


def load_bytes(instr):
    m = re.search(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", instr)
    if not m:
        return 0
    mods = m.group(1)
    for mod, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if f".{mod}" in mods:
            return width
    return 4


def main_loop(body, labels):
    """(instructions, global-load bytes, widest load) of the main loop, or None."""
    loops = []
    for address, instr in body:
        m = re.search(r"\bBRA(?:\.U)?\s+(?:`\((\.L_x_\d+)\)|0x([0-9a-f]+))", instr)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        if target is None:
            continue
        if target > address:
            continue
        inside = [i for a, i in body if target <= a <= address]
        widths = [load_bytes(i) for i in inside]
        if max(widths, default=0) == 0:
            continue
        loops.append((max(widths), -len(inside), sum(widths), len(inside)))
    if not loops:  # loop-free (values unrolled into registers): the whole body
        widths = [load_bytes(i) for _, i in body]
        return (len(body), sum(widths), max(widths)) if max(widths, default=0) else None
    widest, _, total_bytes, count = max(loops)
    return count, total_bytes, widest


def resource_usage(text):
    """{mangled name: dict(REG=, STACK=, SHARED=, LOCAL=)} from cuobjdump -res-usage."""
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


def kernel_rows(cubin):
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        sys.exit("cuobjdump not found: install the test extra (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    functions, labels = parse_sass(sass)
    usage = resource_usage(res)
    names = sorted(functions)
    rows = []
    for mangled, demangled in zip(names, demangle(names)):
        info = value_info(demangled)
        loop = main_loop(functions[mangled], labels[mangled]) if info else None
        u = usage.get(mangled, {})
        row = {"kernel": short_name(demangled), "regs": u.get("REG", 0),
               "spills": u.get("LOCAL", 0) + u.get("STACK", 0), "smem": u.get("SHARED", 0),
               "loop_instr_per_value": None, "load_bytes": None, "value_bytes": info[0] if info else None}
        if loop is not None:
            count, total_bytes, widest = loop
            values = total_bytes / info[0] / info[1]
            row["loop_instr_per_value"] = count / values
            row["load_bytes"] = widest
        rows.append(row)
    return rows


def over_budget(row):
    """The budgets a kernel misses, as words."""
    misses = []
    if row["regs"] > REG_BUDGET:
        misses.append(f"regs {row['regs']} > {REG_BUDGET}")
    if row["spills"] > 0:
        misses.append(f"spills {row['spills']}")
    ipv, size = row["loop_instr_per_value"], row["value_bytes"]
    if ipv is not None and size in INSTR_BUDGET and ipv > INSTR_BUDGET[size]:
        misses.append(f"{ipv:.1f} instr/value > {INSTR_BUDGET[size]:g}")
    # Vector widths exist only where the kernel has a vector path: scalar
    # instantiations (`,1,` width) and double are allowed narrow loads.
    vector = re.search(r",(\d+),", row["kernel"])
    if row["load_bytes"] is not None and row["load_bytes"] < 16 and not (vector and vector.group(1) == "1"):
        if size != 8:
            misses.append(f"widest load {row['load_bytes']} B")
    return misses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel misses a budget")
    parser.add_argument("--md", help="also write the table as markdown")
    parser.add_argument("--cubin", help="read this cubin instead of compiling")
    args = parser.parse_args()
    cubin = args.cubin
    if cubin is None:
        os.makedirs(BUILD, exist_ok=True)
        cubin = os.path.join(BUILD, f"group_norm_cuda.sm_{args.arch}.cubin")
        t0 = time.time()
        subprocess.run(nvcc_command(args.arch, cubin), check=True)
        print(f"compiled for sm_{args.arch} in {time.time() - t0:.0f} s", file=sys.stderr)
    rows = kernel_rows(cubin)
    lines, missed = [], []
    for row in rows:
        ipv = "-" if row["loop_instr_per_value"] is None else f"{row['loop_instr_per_value']:.1f}"
        loads = "-" if row["load_bytes"] is None else str(row["load_bytes"])
        lines.append(f"sass {row['kernel']} regs {row['regs']} spills {row['spills']} smem {row['smem']} "
                     f"loop_instr_per_value {ipv} load_bytes {loads}")
        misses = over_budget(row)
        if misses:
            missed.append(f"{row['kernel']}: {', '.join(misses)}")
    print("\n".join(lines))
    print(f"{len(rows)} kernels, {len(missed)} over a budget")
    for m in missed:
        print(f"  OVER {m}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# SASS of the CUDA kernels, sm_{args.arch}\n\n")
            f.write("| kernel | regs | spills | smem | loop instr / value | widest load |\n|---|---|---|---|---|---|\n")
            for row in rows:
                ipv = "-" if row["loop_instr_per_value"] is None else f"{row['loop_instr_per_value']:.1f}"
                f.write(f"| `{row['kernel']}` | {row['regs']} | {row['spills']} | {row['smem']} | {ipv} | "
                        f"{row['load_bytes'] or '-'} |\n")
            f.write(f"\n{len(missed)} of {len(rows)} kernels over a budget:\n\n")
            f.write("".join(f"- {m}\n" for m in missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
