"""Cost of the CUDA kernels read from their compiled code, without a GPU.

Compiles the kernels' translation units (csrc/cuda/launches/*.cu, one per
dtype, in parallel) for one architecture (default sm_90) with the build's own
nvcc flags, disassembles it (cuobjdump / nvdisasm from the
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, or the toolkit's), and
prints one line per kernel instantiation and phase (the phase function the
fused kernel calls, found from the line info of its inlined code):

    sass <kernel>/<phase> regs <n> spills <bytes> stack <bytes> smem <bytes> loop_instr_per_value <x> load_bytes <n>

regs, spills (spill stores, from ptxas -v), stack (frame: spills and local
arrays) and smem are the kernel's. loop_instr_per_value: SASS instructions of
the phase's main loop per element it consumes (per position: x, or x and dy);
load_bytes: the widest data load in that loop (the sequencing's volatile and
L2 loads do not count). The main loop is the loop (a backward branch) with the
phase's widest load, the shortest such loop where several have it; a phase
whose widest loads are all unrolled counts its whole code. Then the budgets of the
design (docs/design.md): <= 8 instructions per 16-bit value and <= 12 per fp32
value, <= 64 registers, no spills, 16-byte loads where aligned; every kernel
over a budget is listed, and --check makes that an error.

    python bench/cuda_sass.py [--arch 90] [--check] [--md FILE] [--cubin FILE ...]
"""
import argparse
import concurrent.futures
import glob
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


def launch_sources():
    """The translation units that instantiate the kernels, one per dtype."""
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "launches", "*.cu")))


def nvcc_command(arch, source, out):
    import torch.utils.cpp_extension as ext

    sys.path.insert(0, os.path.join(ROOT, "gnflex"))
    import _sources  # reads the build's flags (plain module, no gnflex import)

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [f"-I{p}" for p in ext.include_paths(device_type="cuda")]
    nvcc_flags = _sources.build_table(os.path.join(ROOT, "csrc"))["nvcc"]
    return ([os.path.join(cuda_home, "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "-Xptxas", "-v",
             *nvcc_flags, *ext.COMMON_NVCC_FLAGS, "-std=c++20", "-DGNFLEX_PYTHON_MODULE",
             "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", *includes,
             "-o", out, source])


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


def scalar_bytes(demangled):
    """Bytes of the kernel's scalar_t (its first floating template argument)."""
    args = re.sub(r"\(gnflex::Activation\)", "", demangled).split("(", 1)[0]
    hits = [(args.find(full), size) for full, (_, size) in SCALARS.items() if args.find(full) >= 0]
    return min(hits)[1] if hits else None


def values_per_position(kernel, phase):
    """Tensors a phase reads per position: x and dy for gradient sums and dx, else x."""
    return 2 if phase.startswith("grad_sums") or (phase.startswith("apply") and "backward" in kernel) else 1


def parse_sass(text):
    """nvdisasm -g -gi output -> {mangled name: [(address, instruction, phase)]} and
    {mangled name: {label: address}}. An instruction's phase is the phase function
    the kernel called it from: the callee named at the innermost call site in
    group_norm_launch.cuh of its inline chain (None for the kernel's own code)."""
    functions, labels = {}, {}
    current, pending, phase = None, [], None
    chain = []
    for line in text.splitlines():
        m = re.match(r"\.text\.(\S+):", line)
        if m:
            current = m.group(1)
            functions[current], labels[current] = [], {}
            pending, phase, chain = [], None, []
            continue
        if current is None:
            continue
        if line.lstrip().startswith("//## File"):
            chain.append(line)
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            if chain:
                phase = phase_of(chain)
                chain = []
            address = int(m.group(1), 16)
            for label in pending:
                labels[current][label] = address
            pending = []
            functions[current].append((address, m.group(2).strip(), phase))
    return functions, labels


_SOURCE_LINES = {}


PHASE_CALL = re.compile(
    r"\b(chunk_stats_\w+|resident_\w+|residual_sums|grad_sums_\w+|apply_\w+|param_grads\w*)\s*(<(32|kThreads)>)?")


def phase_of(chain):
    """The phase function named at the first call site in group_norm_launch.cuh
    (with its team, warp or block, where it has one); "/merge" marks the
    once-per-domain (or band) merge inside it."""
    for entry in chain:
        own_file = re.search(r'File "([^"]+)"', entry)
        if not own_file or not own_file.group(1).endswith("group_norm_launch.cuh"):
            continue
        call = PHASE_CALL.search(_line_of(entry))
        if not call:
            return None
        team = {"32": "<warp>", "kThreads": "<block>"}.get(call.group(3), "")
        merge = any(re.search(r"(finalize_\w*group|merge_\w*band)\s*(<[^>]*>)?\(", _line_of(e)) for e in chain)
        return call.group(1) + team + ("/merge" if merge else "")
    return None


def _line_of(entry):
    """The source line a '//## File "...", line N' entry names."""
    m = re.search(r'File "([^"]+)", line (\d+)', entry)
    if not m:
        return ""
    path, number = m.group(1), int(m.group(2))
    if path not in _SOURCE_LINES:
        try:
            _SOURCE_LINES[path] = open(path).read().splitlines()
        except OSError:
            _SOURCE_LINES[path] = []
    lines = _SOURCE_LINES[path]
    return lines[number - 1] if 0 < number <= len(lines) else ""


def load_bytes(instr):
    """Width of a global load of data (not the volatile / L2 loads of the sequencing)."""
    m = re.search(r"\bLDG\.E((?:\.[A-Z0-9]+)*)", instr)
    if not m or ".STRONG" in m.group(1):
        return 0
    mods = m.group(1)
    for mod, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if f".{mod}" in mods:
            return width
    return 4


def main_loops(body, labels):
    """{phase: (instructions, global-load bytes, widest load)} of each phase's main
    loop: the loop (a backward branch) with the widest data load of the phase, the
    shortest such loop where several have it; a phase whose widest loads are all
    unrolled counts its whole code."""
    phase_widest = {}
    for _, instr, ph in body:
        phase_widest[ph] = max(phase_widest.get(ph, 0), load_bytes(instr))
    loops = {}
    for address, instr, _ in body:
        m = re.search(r"\bBRA(?:\.U)?\s+(?:`\((\.L_x_\d+)\)|0x([0-9a-f]+))", instr)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        if target is None or target > address:
            continue
        inside = [(i, ph) for a, i, ph in body if target <= a <= address]
        widths = [(load_bytes(i), ph) for i, ph in inside]
        widest = max(widths, key=lambda t: t[0], default=(0, None))
        if widest[0] == 0 or widest[1] is None or widest[0] < phase_widest[widest[1]]:
            continue
        key = (widest[0], -len(inside))
        if widest[1] not in loops or key > loops[widest[1]][0]:
            loops[widest[1]] = (key, (len(inside), sum(w for w, _ in widths), widest[0]))
    result = {ph: v[1] for ph, v in loops.items()}
    for ph in {ph for _, _, ph in body if ph is not None} - set(result):
        code = [i for _, i, p in body if p == ph]
        widths = [load_bytes(i) for i in code]
        if max(widths, default=0):
            result[ph] = (len(code), sum(widths), max(widths))
    return result


def per_function(text, header, value):
    """{function: value(m)} for the first line matching `value` after each line
    matching `header` (whose group 1 names the function)."""
    found, current = {}, None
    for line in text.splitlines():
        m = re.search(header, line)
        if m:
            current = m.group(1)
            continue
        m = re.search(value, line) if current else None
        if m:
            found[current] = m
            current = None
    return found


def resource_usage(text):
    """{mangled name: dict(REG=, STACK=, SHARED=, LOCAL=)} from cuobjdump -res-usage."""
    rows = per_function(text, r"^\s*Function (\S+):", r"REG:\d+.*")
    return {name: {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", m.group(0))}
            for name, m in rows.items()}


def ptxas_spills(log):
    """{mangled name: spill store bytes} from ptxas -v output."""
    rows = per_function(log, r"Function properties for (\S+)", r"(\d+) bytes spill stores")
    return {name: int(m.group(1)) for name, m in rows.items()}


def kernel_rows(cubin, spills):
    """A row per (kernel, phase): the kernel's resources and the phase's main loop."""
    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        sys.exit("cuobjdump / nvdisasm not found: install the test extra "
                 "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    sass = subprocess.run([nvdisasm, "-g", "-gi", cubin], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    functions, labels = parse_sass(sass)
    usage = resource_usage(res)
    names = sorted(n for n in functions if n.startswith("_Z"))
    rows = []
    for mangled, demangled in zip(names, demangle(names)):
        size = scalar_bytes(demangled)
        kernel = short_name(demangled)
        u = usage.get(mangled, {})
        base = {"regs": u.get("REG", 0), "spills": spills.get(mangled, u.get("LOCAL", 0)), "stack": u.get("STACK", 0),
                "smem": u.get("SHARED", 0), "value_bytes": size}
        loops = main_loops(functions[mangled], labels[mangled]) if size else {}
        if not loops:
            rows.append(dict(base, kernel=kernel, loop_instr_per_value=None, load_bytes=None))
        for phase, (count, total_bytes, widest) in sorted(loops.items()):
            if phase.endswith("/merge") or phase.startswith("param_grads"):  # per domain / channel, not per value
                continue
            values = total_bytes / size / values_per_position(kernel, phase)
            rows.append(dict(base, kernel=f"{kernel}/{phase}", loop_instr_per_value=count / values, load_bytes=widest))
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
    # Scalar channels-last instantiations (`,1,` width: C or the pointers not
    # 16-byte aligned) are allowed narrow loads.
    scalar = re.search(r",1,", row["kernel"])
    if row["load_bytes"] is not None and row["load_bytes"] < 16 and not scalar:
        misses.append(f"widest load {row['load_bytes']} B")
    return misses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90")
    parser.add_argument("--check", action="store_true", help="exit 1 when a kernel misses a budget")
    parser.add_argument("--md", help="also write the table as markdown")
    parser.add_argument("--cubin", nargs="+",
                        help="read these cubins (compiled from the current sources) instead of compiling")
    args = parser.parse_args()
    cubins = args.cubin
    if cubins is None:
        os.makedirs(BUILD, exist_ok=True)
        sources = launch_sources()
        cubins = [os.path.join(BUILD, f"{os.path.splitext(os.path.basename(src))[0]}.sm_{args.arch}.cubin")
                  for src in sources]
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            runs = list(pool.map(lambda sc: subprocess.run(nvcc_command(args.arch, *sc), capture_output=True,
                                                           text=True), zip(sources, cubins)))
        for cubin, done in zip(cubins, runs):
            with open(cubin + ".ptxas.log", "w") as f:
                f.write(done.stdout + done.stderr)
            if done.returncode != 0:
                sys.exit(done.stderr[-4000:])
        print(f"compiled {len(sources)} translation units for sm_{args.arch} in {time.time() - t0:.0f} s",
              file=sys.stderr)
    rows = []
    for cubin in cubins:
        log_path = cubin + ".ptxas.log"
        log = open(log_path).read() if os.path.exists(log_path) else ""
        rows += kernel_rows(cubin, ptxas_spills(log))
    lines, missed = [], []
    for row in rows:
        ipv = "-" if row["loop_instr_per_value"] is None else f"{row['loop_instr_per_value']:.1f}"
        loads = "-" if row["load_bytes"] is None else str(row["load_bytes"])
        lines.append(f"sass {row['kernel']} regs {row['regs']} spills {row['spills']} stack {row['stack']} "
                     f"smem {row['smem']} "
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
