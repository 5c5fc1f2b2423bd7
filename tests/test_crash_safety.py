"""Nothing is lost when a process dies or the disk fills: `flashmem convert` killed with SIGKILL at
random moments leaves nothing or a whole folder, never a half-written one that loads (bank saves:
tests/test_memory.py::test_killed_saves_leave_a_loadable_bank); a full disk (a small tmpfs) gives
an error naming the file, and the previous files are intact. FLASHMEM_KILLS sets the number of
kills per case (default 4 here, 10 for bank saves)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import flashmem

KILLS = int(os.environ.get("FLASHMEM_KILLS", "4"))


def killed_after(code: str, delay: float) -> int:
    """Runs python -c code, SIGKILLs it after `delay` seconds (if it is still running); its rc."""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode


def test_convert_killed_at_random_leaves_nothing_or_a_whole_folder(smollm2_gguf, tmp_path):
    """SIGKILL during `convert` (SmolLM2's GGUF, its own formats): afterwards the output folder
    is absent, or it loads and generates what a clean conversion does; abandoned temporary
    folders are removed by the next convert."""
    reference = flashmem.convert(smollm2_gguf, str(tmp_path / "clean"), progress=False)
    want = flashmem.load(reference, threads=1).generate("The capital of France is", max_new_tokens=4).token_ids
    t0 = time.perf_counter()
    flashmem.convert(smollm2_gguf, str(tmp_path / "timed"), progress=False)
    took = time.perf_counter() - t0 + 1.5  # and the interpreter's start
    rng = random.Random(0)
    outcomes = {"absent": 0, "whole": 0}
    for i in range(KILLS):
        out = str(tmp_path / f"out{i}")
        killed_after(f"import flashmem; flashmem.convert({smollm2_gguf!r}, {out!r}, progress=False)",
                     rng.uniform(0.3, took))
        if not os.path.exists(out):
            outcomes["absent"] += 1
            continue
        got = flashmem.load(out, threads=1).generate("The capital of France is", max_new_tokens=4).token_ids
        assert got == want
        outcomes["whole"] += 1
    print(f"\nconvert killed {KILLS} times: {outcomes}")
    assert outcomes["absent"] >= 1  # most kills land mid-conversion
    abandoned = sorted(e for e in os.listdir(tmp_path) if ".tmp-" in e)
    print(f"abandoned temporary folders: {len(abandoned)}")
    for e in abandoned:  # the next convert to the same output removes them
        out = str(tmp_path / e.split(".tmp-")[0])
        if not os.path.exists(out):
            flashmem.convert(smollm2_gguf, out, progress=False)
        assert not os.path.exists(tmp_path / e)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_gives_a_clear_error_and_keeps_previous_files(smollm2_gguf, small_disk):
    """A bank saved, then a bigger one that does not fit: an error naming the file, and the first
    one loads as it was. A conversion that does not fit: an error naming the output, no folder,
    no temporary folder, and the bank still there."""
    path = str(small_disk / "m.bank")
    small = flashmem.MemoryBank(64)
    small.add(np.ones((10, 64), np.float32), texts=["kept"] * 10)
    small.save(path)
    big = flashmem.MemoryBank(64)
    big.add(np.random.default_rng(0).standard_normal((120_000, 64)).astype(np.float32))  # 31 MB of keys
    with pytest.raises(RuntimeError, match="m.bank.*No space left on device"):  # the core's I/O errors
        big.save(path)
    again = flashmem.MemoryBank.load(path)
    assert len(again) == 10 and again.get(again.ids()[0]).text == "kept"

    out = str(small_disk / "converted")
    with pytest.raises(OSError, match="converted.*No space left on device"):
        flashmem.convert(smollm2_gguf, out, progress=False)
    assert sorted(os.listdir(small_disk)) == ["m.bank"]
    assert len(flashmem.MemoryBank.load(path)) == 10
