"""Fuzzing, the CI slice (issue 18): FLASHMEM_FUZZ_CASES structure-aware mutations per format
(default 400; tests/fuzz_targets.py) of small valid GGUF, safetensors (resident weights, bundles,
predictor), memory-bank, config.json and tokenizer files, each loaded through the public API in a
child process: no crash, no hang, no allocation the address-space limit refuses, and only the
exceptions the engine's rule allows (ValueError, OSError, RuntimeError). FLASHMEM_FUZZ_FIRST
moves the window of case seeds. The long campaign is bench/fuzz.py.

Every input a campaign found a bug with is in tests/fuzz_regressions/ (<format>-<seed>.bin or
.json): each loads with a clean exception (or loads)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fuzz_targets as ft

CASES = int(os.environ.get("FLASHMEM_FUZZ_CASES", "400"))
FIRST = int(os.environ.get("FLASHMEM_FUZZ_FIRST", "0"))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return ft.build_seeds(str(tmp_path_factory.mktemp("fuzz") / "seeds"))


@pytest.mark.parametrize("fmt", ft.FORMATS)
def test_fuzz_slice(fmt, seeds, tmp_path):
    found_dir = tmp_path / "found"
    s = ft.run_cases(fmt, range(FIRST, FIRST + CASES), seeds, str(tmp_path / "work"), jobs=2, save_to=str(found_dir))
    print(f"\n{fmt}: {s['cases']} cases in {s['seconds']} s: ok {s['ok']}, exceptions {s['exceptions']}")
    assert s["cases"] == CASES
    found = {k: s[k] for k in ("crashes", "hangs", "oom", "unexpected", "baseexception", "harness") if s[k]}
    assert not found, f"{fmt}: {found}; the inputs are in {found_dir} (for tests/fuzz_regressions/)"


@pytest.fixture(scope="module")
def workers(seeds, tmp_path_factory):
    """One worker process per format, shared by the regression tests."""
    pool: dict = {}

    def worker(fmt: str) -> ft.Worker:
        if fmt not in pool:
            pool[fmt] = ft.Worker(fmt, seeds, str(tmp_path_factory.mktemp(f"reg-{fmt}")), fmt)
        return pool[fmt]

    yield worker
    for w in pool.values():
        w.stop()


@pytest.mark.parametrize("fmt, seed, path", ft.regression_files(),
                         ids=[os.path.basename(p) for _, _, p in ft.regression_files()])
def test_regression(fmt, seed, path, workers):
    out = workers(fmt).run(seed, path)
    assert out["kind"] in ("ok", "error"), out


def test_threads_that_cannot_start_raise(seeds):
    """Found by the campaign (a worker whose address space had filled): when the I/O threads of a
    flash engine, or the compute threads, cannot be started, loading raises RuntimeError; it used
    to abort the process (a joinable std::thread destroyed while its constructor unwound)."""
    code = f"""
import resource
import flashmem
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (40 << 20), resource.RLIM_INFINITY))
for kw in (dict(offload="flash", dram_budget="64MB"), dict(threads=64)):
    try:
        flashmem.load({os.path.join(seeds, 'conv_f16')!r}, max_context=32, **{{"threads": 1, **kw}})
        print("loaded")
    except RuntimeError as e:
        print("RuntimeError", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("RuntimeError cannot start") for line in lines), r.stdout
