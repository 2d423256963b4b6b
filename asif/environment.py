"""Where a run happens: the machine, Colab, and the Debian packages that hold the offline data.

``setup_notebook()`` is the first call of every notebook: in Colab it
installs the data packages that are missing (asif/data/apt-packages.txt,
the list ``run.sh`` installs too), then it says which mode and device the
notebook runs on. ``compile_kernels()`` is the install's last step in
``run.sh``: the first real run then finds the numba kernels compiled.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

from asif.config import DATA_DIR, is_smoke
from asif.errors import ASIFInputError

__all__ = ["APT_PACKAGES", "in_colab", "machine_summary", "missing_apt_packages", "setup_notebook", "one_line_errors",
           "compile_kernels"]

APT_PACKAGES = tuple((DATA_DIR / "apt-packages.txt").read_text().split())


def in_colab() -> bool:
    return "google.colab" in sys.modules


def machine_summary() -> dict:
    """Device, GPU memory and library versions: what a result was computed on."""
    import torch
    import asif_core
    dev = asif_core.pick_device("auto")
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(dev), "smoke": is_smoke(), "colab": in_colab()}
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        out.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_GiB=round(total / 2**30, 1),
                   gpu_free_GiB=round(free / 2**30, 1))
    for mod in ("numpy", "torch", "timm", "sentence_transformers", "open_clip", "scipy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # an optional library that is absent is simply not reported
            out[mod] = None
    return out


def missing_apt_packages() -> list[str]:
    """The data packages of APT_PACKAGES that dpkg does not list as installed ([] without dpkg)."""
    if not shutil.which("dpkg"):
        return []
    return [p for p in APT_PACKAGES
            if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]


def setup_notebook(install: bool | None = None) -> dict:
    """First cell of every notebook: install missing data packages (Colab), print mode and device.

    ``install`` defaults to True in Colab (root, apt-get there) and False
    elsewhere, where ``bash run.sh`` installs them. Without them the loaders
    fetch what they can from the public sources, or say what to install.
    """
    if install is None:
        install = in_colab()
    missing = missing_apt_packages() if install else []
    if missing:
        print("installing", " ".join(missing), "...", flush=True)
        subprocess.run("apt-get -qq update && apt-get -qq install -y --no-install-recommends " + " ".join(missing),
                       shell=True, check=False, stdout=subprocess.DEVNULL)
    one_line_errors()
    info = machine_summary()
    print("smoke mode" if info["smoke"] else "full mode", "| device:", info["device"])
    return info


def one_line_errors() -> bool:
    """In IPython, an ``ASIFInputError`` (a choice that can't run here, a bad input) shows as its
    one-line message instead of a traceback; the cell still fails. False outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False

    def short(shell, etype, value, tb, tb_offset=None):
        # IPython hands the error to this handler and shows nothing itself
        stb = [f"{etype.__name__}: {value}"]
        shell._showtraceback(etype, value, stb)
        return stb

    shell.set_custom_exc((ASIFInputError,), short)
    return True


def compile_kernels() -> list[str]:
    """Compile the numba kernels (selection, scoring, exact recomputation) into numba's on-disk cache.

    Each kernel compiles for the argument types it is first called with, ~10 s
    in all; a first ``asif sweep`` would otherwise pay that inside its run.
    Tiny calls with the types the core uses on the CPU (float32 and float64,
    every scoring way, the bfloat16 first pass where this CPU has it) fill
    the cache. Returns what was compiled; empty without numba.
    """
    import numpy as np
    import asif_core as ac
    from asif import precision, scoring
    from asif.config import numba_module
    if numba_module() is None:
        return []
    rng = np.random.default_rng(0)
    a, t = rng.random((600, 16), dtype=np.float32), rng.random((600, 8), dtype=np.float32)
    x, p = rng.random((20, 16), dtype=np.float32), rng.random((6, 8), dtype=np.float32)
    done = []
    for dtype in ("float32", "float64"):
        for way in ("dense", "sparse", "mixed"):
            with scoring.forced(way=way):
                for reduce in ac.REDUCES:
                    ac.classify(a, t, x, p, 3, non_zeros=50, reduce=reduce, device="cpu", dtype=dtype)
        done.append(f"selection and scoring ({dtype})")
    if precision.fast_bf16("cpu")[0]:
        ac.classify(a, t, x, p, 3, non_zeros=50, device="cpu", first_pass="bf16")
        done.append("bfloat16 first pass")
    return done
