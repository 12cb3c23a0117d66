"""The C++/CUDA sources of the op library and their flags (read from
csrc/build_flags.txt), shared by setup.py, gnflex.jit and bench/cuda_sass.py;
the build fingerprint .ci/setup.sh compares.

Plain module with no imports from gnflex, so setup.py can run it by path
before the package is built.
"""
import glob
import hashlib
import os
import subprocess
import sys


def build_table(csrc_dir):
    """csrc/build_flags.txt, the one description of the build: {name: [words]}."""
    table = {}
    with open(os.path.join(csrc_dir, "build_flags.txt")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, words = line.partition(":")
                table[name.strip()] = words.split()
    return table


def sources(csrc_dir):
    """(cpp_sources, cuda_sources) under csrc_dir, sorted."""
    table = build_table(csrc_dir)
    def under(dirs, pattern):
        return sorted(os.path.normpath(p) for d in dirs for p in glob.glob(os.path.join(csrc_dir, d, pattern)))

    return under(table["cpp_dirs"], "*.cpp"), under(table["cuda_dirs"], "*.cu")


def is_gcc(compiler):
    """Whether `compiler` (a command) is g++ rather than clang++ or another."""
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out.lower()


def host_flags(table, compiler):
    """The host compiler flags of build_flags.txt for `compiler`: cxx, and
    cxx_gcc for g++."""
    return table["cxx"] + (table.get("cxx_gcc", []) if is_gcc(compiler) else [])


def default_cuda_archs(csrc_dir):
    """TORCH_CUDA_ARCH_LIST's value when it is unset."""
    return ";".join(build_table(csrc_dir)["cuda_archs"])


# Build settings read from the environment; part of the fingerprint.
BUILD_ENV = ("GNFLEX_CUDA", "GNFLEX_DEBUG", "GNFLEX_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX")


def fingerprint(root):
    """Hash of everything a build of the checkout at `root` depends on: the
    package's files (sources, Python, build scripts) and BUILD_ENV. setup.py
    records it in gnflex/_build_info.py; .ci/setup.sh skips the rebuild when
    the installed package has the checkout's fingerprint."""
    files = [os.path.join(root, name) for name in ("setup.py", "pyproject.toml")]
    for top in ("csrc", "gnflex"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f != "_build_info.py" and not f.endswith(".pyc")]
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    for name in BUILD_ENV:
        digest.update(f"{name}={os.environ.get(name, '')}\0".encode())
    return digest.hexdigest()[:20]


if __name__ == "__main__":  # python gnflex/_sources.py ROOT: print the fingerprint
    print(fingerprint(sys.argv[1]))
