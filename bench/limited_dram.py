"""Decode speed under a DRAM limit: each engine in a Linux memory cgroup (v1) of a given size,
SmolLM2-135M-Instruct Q4_1, llama.cpp (llama-cpp-python) beside flashmem all in DRAM and
flashmem streaming its FFN from flash.

    python bench/limited_dram.py [--modes llamacpp,llamacpp_norepack,flashmem_dram,flashmem_flash_s0,flashmem_flash_s50]
                                 [--limits 400,300,250,200,175,150,130,120,110,100,90,80,70,60,50]
                                 [--new-tokens 48] [--repeats 1] [--timeout 300] [--flash-dtype gguf] [--quick]

Needs root and the cgroup v1 memory controller. Every run is a fresh child process
(bench/limited_dram_worker.py) moved into a child memory group of this process's own group
before it starts Python (a shell writes its pid to cgroup.procs, then execs the worker), so every
page it allocates, and every page of the page cache it reads in (llama.cpp's mmap'd model file
included), is charged to that group. The group's memory.limit_in_bytes (and
memory.memsw.limit_in_bytes, so that swap cannot stretch it) is the limit; the kernel reclaims
page cache to stay under it and OOM-kills the child when it cannot. The page cache is dropped
before every run (sync; echo 3 > /proc/sys/vm/drop_caches), so no run finds the model cached by
another (cgroup v1 charges a page to the group that first reads it).

Modes (see the worker): llamacpp (default repacking), llamacpp_norepack (use_extra_bufts off),
flashmem_dram (dtype "gguf", every weight in the engine's buffers), flashmem_all_sNN (offload "all":
every matrix read from the folder when needed, FFN through the neuron cache), flashmem_flash_sNN (offload
"flash", sparsity NN%, dram_budget "auto" = the group's limit less its usage, less headroom, or
with --flash-budget limit-N the limit less N MiB; dtype --flash-dtype; either with a _hot suffix:
the neuron cache's eviction "hot" instead of "lru"; then _noahead: read_ahead=0). Each child generates
--new-tokens tokens greedily after the first --prompt-tokens tokens of tinyshakespeare (after a
4-token untimed warm-up generation) and reports decode tok/s
(tokens after the first / their time), prefill tok/s, peak RSS and, when streaming, bytes read per
token (llama.cpp: disk_read_per_token, what the kernel read from the disk for its decode steps,
/proc/self/io read_bytes: the page faults of the mapped file). This script adds the group's peak
usage (memory.max_usage_in_bytes: page cache included), its failcnt, whether the child was
OOM-killed, exit status, wall time and the stderr tail of a failure.

Order: first every mode without a limit (in a group without a limit: its footprint), then each
limit of --limits from the largest down, modes interleaved at each limit, repeats interleaved
too. With --skip-above-footprint a limit at or above a mode's footprint is not run (status
"above_footprint": the unlimited run stands for it). A mode stops once it failed (oom, timeout or
error) at two successive limits. Statuses: ok, oom (killed by the kernel in its group), timeout
(thrashing: slower than --timeout seconds for the whole run), error (the engine refused, e.g. a
budget below its resident minimum; the message is kept). With --repeats > 1 the figures are
medians of the runs that succeeded, and a limit counts as ok only if every run was.

Before the sweep and outside any group, the GGUF is converted for each flashmem dtype used (so no
run converts), and for flash modes with sparsity the predictor is fitted once (`flashmem
calibrate` on tinyshakespeare) if the converted folder has none. With --replay-trace (a model
without a predictor of its own, such as the random-weight 7B-class test model) the sparse modes
replay SmolLM2's real predictor selections instead, mapped onto the model's layers and neurons
(limited_dram_worker.make_trace), one selection per token the run computes.

MB here means MiB (2**20 bytes), in limits and results alike.
After the sweep, for each flashmem run that streamed, the disk's raw random-read bandwidth at the
run's mean request size is measured (the engine's reader, direct I/O over the bundle file, outside
any group) and with it the physical bound: raw bandwidth / bytes a token reads; each such summary
gets io_bound (request size, raw GB/s, bound tok/s, the share of it reached).
Writes bench/results/limited_dram.json and .png, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save  # noqa: E402
from limited_dram_worker import RESULT_TAG, ahead_path, flash_mode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "limited_dram_worker.py")
MIB = 2 ** 20
ALL_MODES = ("llamacpp", "llamacpp_norepack", "flashmem_dram", "flashmem_flash_s0", "flashmem_flash_s50",
             "flashmem_all_s0")
DEFAULT_LIMITS = "400,300,250,200,175,150,130,120,110,100,90,80,70,60,50"
QUICK_LIMITS = "200,120,40"
FAILED = ("oom", "timeout", "error")


# --- cgroup v1 -----------------------------------------------------------------------------------
def own_memory_cgroup() -> str:
    """The directory of this process's memory cgroup (v1)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                d = "/sys/fs/cgroup/memory" + path
                if os.path.isfile(os.path.join(d, "memory.limit_in_bytes")):
                    return d
    raise SystemExit("no cgroup v1 memory controller for this process (/proc/self/cgroup, /sys/fs/cgroup/memory)")


class Group:
    """A child memory cgroup with an optional limit; removed by close()."""

    def __init__(self, parent: str, name: str, limit: int | None):
        self.path = os.path.join(parent, name)
        os.mkdir(self.path)
        if limit is not None:
            # a new group starts unlimited; memsw (memory + swap) must stay >= limit_in_bytes, so the
            # limit goes first when lowering, memsw after it
            self.write("memory.limit_in_bytes", limit)
            if os.path.exists(self.file("memory.memsw.limit_in_bytes")):
                self.write("memory.memsw.limit_in_bytes", limit)
            self.write_optional("memory.swappiness", 0)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write(self, name: str, value) -> None:
        with open(self.file(name), "w") as f:
            f.write(str(value))

    def write_optional(self, name: str, value) -> None:
        try:
            self.write(name, value)
        except OSError:
            pass

    def read(self, name: str) -> str | None:
        try:
            with open(self.file(name)) as f:
                return f.read()
        except OSError:
            return None

    def read_int(self, name: str) -> int | None:
        v = self.read(name)
        return int(v) if v is not None and v.strip().lstrip("-").isdigit() else None

    def oom_control(self) -> dict:
        out = {}
        for line in (self.read("memory.oom_control") or "").splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    def close(self) -> None:
        """rmdir (the page cache still charged here moves to the parent group)."""
        for i in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if i == 10:
                    self.write_optional("memory.force_empty", 0)
                time.sleep(0.1)
        print(f"warning: could not remove {self.path}", file=sys.stderr)


def drop_caches(warned=[]) -> None:  # noqa: B006 - warn once
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        if not warned:
            print(f"warning: cannot drop the page cache ({e}); runs may find the model cached", file=sys.stderr)
            warned.append(1)


# --- one run --------------------------------------------------------------------------------
def run_one(base_group: str, name: str, mode: str, limit_mb: int | None, worker_args: list[str],
            timeout: float) -> dict:
    """One child in a fresh group: its result line, plus the group's figures and how it ended."""
    drop_caches()
    g = Group(base_group, name, None if limit_mb is None else limit_mb * MIB)
    cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', g.file("cgroup.procs"), sys.executable, WORKER,
           "--mode", mode] + worker_args
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or Ctrl-C: end this run's child, remove its group
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the session this run's child leads
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        if not isinstance(e, subprocess.TimeoutExpired):
            g.close()
            raise
        timed_out = True
    wall = time.perf_counter() - t0
    peak = g.read_int("memory.max_usage_in_bytes")
    oom = g.oom_control()
    rec = {"limit_mb": limit_mb, "wall_s": wall, "returncode": p.returncode,
           "peak_cgroup_mb": peak / MIB if peak is not None else None,
           "failcnt": g.read_int("memory.failcnt"), "oom_kill": oom.get("oom_kill"),
           "memsw_peak_mb": (g.read_int("memory.memsw.max_usage_in_bytes") or 0) / MIB}
    g.close()
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT_TAG)), None)
    child = json.loads(line[len(RESULT_TAG):]) if line else {}
    rec.update({k: v for k, v in child.items() if k not in ("mode", "pid")})
    killed = p.returncode == -signal.SIGKILL or p.returncode == 128 + signal.SIGKILL
    if timed_out:
        rec["status"], rec["message"] = "timeout", f"no result after {timeout:.0f} s (killed)"
    elif child.get("status") == "ok" and p.returncode == 0:
        rec["status"] = "ok"
    elif (oom.get("oom_kill") or 0) > 0 or (killed and limit_mb is not None):
        rec["status"] = "oom"
        rec["message"] = f"killed by the kernel's OOM killer (oom_kill {oom.get('oom_kill')}, rc {p.returncode})"
    elif child.get("status") == "error":
        rec["status"] = "error"
    else:
        rec["status"] = "error"
        rec["message"] = f"exit status {p.returncode} without a result"
    if rec["status"] != "ok":
        rec["stderr_tail"] = err[-1500:]
    return rec


def summarize(runs: list[dict]) -> dict:
    """One mode at one limit over its repeats: medians of the successful runs."""
    ok = [r for r in runs if r["status"] == "ok"]
    fails = [r for r in runs if r["status"] != "ok"]
    s = {"limit_mb": runs[0]["limit_mb"], "status": "ok" if not fails else fails[0]["status"],
         "ok_runs": len(ok), "runs": runs}
    if fails:
        s["message"] = fails[0].get("message", "")
        if ok:
            s["message"] += f" ({len(ok)} of {len(runs)} runs ok)"
    peaks = [r["peak_cgroup_mb"] for r in runs if r.get("peak_cgroup_mb") is not None]
    s["peak_cgroup_mb"] = max(peaks) if peaks else None
    for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_mb", "bytes_read_per_token", "disk_read_per_token",
                "owned_mb", "dram_budget_mb", "wall_s"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        s[key] = median(vals) if vals else None
    if ok:
        s["new_tokens"] = ok[0].get("new_tokens")
    return s


def same_tokens(results: dict, modes: list[str]) -> None:
    """Adds to each summary `same_tokens`: how many leading new tokens every successful run of it
    shares with the reference (flashmem_dram without a limit, else the first successful run)."""
    order = (["flashmem_dram"] if "flashmem_dram" in modes else []) + list(modes)
    ref = next((r["tokens"] for m in order for s in results[m].values() for r in s.get("runs", [])
                if r["status"] == "ok" and r.get("tokens")), None)
    if ref is None:
        return
    for m in modes:
        for s in results[m].values():
            oks = [r["tokens"] for r in s.get("runs", []) if r["status"] == "ok" and r.get("tokens")]
            if oks:
                s["same_tokens"] = min(next((i for i, (x, y) in enumerate(zip(t, ref)) if x != y),
                                            min(len(t), len(ref))) for t in oks)


def best_of(a: dict | None, b: dict | None, names: tuple[str, str]) -> dict | None:
    """The faster successful one of two summaries at one limit (llamacpp vs llamacpp_norepack)."""
    cands = [(x, n) for x, n in ((a, names[0]), (b, names[1])) if x]
    if not cands:
        return None
    ok = [(x, n) for x, n in cands if x["status"] == "ok"]
    if ok:
        x, n = max(ok, key=lambda t: t[0]["decode_tok_s"] or 0.0)
    else:
        x, n = cands[0]
    return {k: v for k, v in x.items() if k != "runs"} | {"from": n}


# --- output ---------------------------------------------------------------------------------------
def cell(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["status"] == "ok":
        return f"{s['decode_tok_s']:.1f}"
    if s["status"] == "above_footprint":
        return "(= none)"
    return s["status"].upper() if s["status"] == "oom" else s["status"]


def label(limit_mb) -> str:
    return "none" if limit_mb is None else f"{limit_mb} MB"


def io_bounds(results: dict, folders: dict, dtype: str) -> None:
    """For every flashmem run that streamed: its mean request size, the disk's raw random-read
    bandwidth at that size (the engine's own reader, queue depth 32, direct I/O over the bundle
    file, measured now, outside any group), and the physical limit that gives: raw bandwidth / the
    bytes a token must read (FFN bundles, plus the attention and LM head weights under
    offload="all"). Adds io_bound = {request_kib, requests_per_token, raw_gbps, bound_tok_s,
    of_bound} to each such summary."""
    from flashmem import _core

    folder = folders.get(dtype)
    path = os.path.join(folder, "ffn_bundles.safetensors") if folder else None
    if not path or not os.path.isfile(path):
        return
    measured = {}
    for mode, by_limit in results.items():
        if not mode.startswith("flashmem_"):
            continue
        for s in by_limit.values():
            runs = [r for r in (s or {}).get("runs", []) if r.get("status") == "ok" and r.get("flash")]
            if not runs or not runs[0]["flash"].get("bytes_read_per_token"):
                continue
            f = runs[0]["flash"]
            per_token = f["bytes_read_per_token"] + f.get("weights_read_per_token", 0.0)
            size = max(4096, int(f["bytes_read_per_token"] / f["requests_per_token"]) // 4096 * 4096)
            if size not in measured:
                n = int(min(max(1.5e9 / size, 64), 20000))
                secs = sorted(_core.disk_random_read(path, size, n, 32, seed)[0] for seed in (1, 2, 3))
                measured[size] = size * n / secs[1] / 1e9
            bound = measured[size] * 1e9 / per_token
            s["io_bound"] = {"request_kib": size / 1024, "requests_per_token": f["requests_per_token"],
                             "raw_gbps": measured[size], "bound_tok_s": bound,
                             "of_bound": s["decode_tok_s"] / bound if s.get("decode_tok_s") else None}
            print(f"{mode} @ {label(s['limit_mb'])}: {s['decode_tok_s']:.3f} tok/s, {per_token / 1e9:.2f} GB a "
                  f"token in {f['requests_per_token']:.0f} requests of {size / 1024:.0f} KiB; raw "
                  f"{measured[size]:.2f} GB/s at that size -> bound {bound:.3f} tok/s, "
                  f"{s['decode_tok_s'] / bound:.2f} of it", flush=True)


def table(results: dict, columns: list[str], limits: list) -> str:
    rows = ["| limit | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for lim in limits:
        cells = [cell(results.get(m, {}).get(label(lim))) for m in columns]
        if all(c == "-" for c in cells):
            continue
        rows.append(f"| {label(lim)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict, columns: list[str], limits: list[int], path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    numeric = sorted(lim for lim in limits if lim is not None)
    none_x = (max(numeric) if numeric else 100) * 1.35  # "none" sits right of the largest limit
    xs = lambda lim: none_x if lim is None else lim  # noqa: E731
    markers = {"oom": "x", "timeout": "v", "error": "s"}
    cmap = plt.get_cmap("tab10")
    oks = [s["decode_tok_s"] for m in columns for s in results.get(m, {}).values()
           if s and s["status"] == "ok" and s.get("decode_tok_s")]
    floor = min(oks) / 3 if oks else 0.1
    for i, mode in enumerate(columns):
        color = cmap(i % 10)
        ss = [results[mode][k] for k in results.get(mode, {}) if results[mode][k]]
        good = sorted(((xs(s["limit_mb"]), s["decode_tok_s"]) for s in ss if s["status"] == "ok" and s["decode_tok_s"]),
                      key=lambda t: t[0])
        ls = "--" if mode == "llamacpp_best" else "-"
        if good:
            ax.plot(*zip(*good), ls, marker="o", color=color, label=mode, ms=4)
        else:
            ax.plot([], [], ls, color=color, label=mode)
        if mode == "llamacpp_best":
            continue  # its failures are those of the two llama.cpp modes; its peaks theirs
        for s in ss:
            if s["status"] in markers:
                ax.plot(xs(s["limit_mb"]), floor * (1.12 ** i), markers[s["status"]], color=color, ms=8, mew=2)
                if s.get("peak_cgroup_mb"):
                    ax2.plot(xs(s["limit_mb"]), s["peak_cgroup_mb"], markers[s["status"]], color=color, ms=8, mew=2)
        pk = sorted(((xs(s["limit_mb"]), s["peak_cgroup_mb"]) for s in ss
                     if s["status"] == "ok" and s.get("peak_cgroup_mb")), key=lambda t: t[0])
        if pk:
            ax2.plot(*zip(*pk), ls, marker="o", color=color, label=mode, ms=4)
    for st, mk in markers.items():
        ax.plot([], [], mk, color="gray", label=st)
    ticks = numeric + [none_x]
    for a_ in (ax, ax2):
        a_.set_xscale("log")
        a_.set_xticks(ticks, [str(t) for t in numeric] + ["none"], fontsize=7, rotation=60)
        a_.minorticks_off()
        a_.invert_xaxis()  # tighter limits to the right
        a_.set_xlabel("memory cgroup limit, MiB")
        a_.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("decode tok/s (log)")
    ax.set_title("decode speed vs memory limit (failures at the bottom)", fontsize=10)
    ax.legend(fontsize=7)
    if numeric:
        ax2.plot(numeric, numeric, ":", color="black", lw=1, label="limit")
    ax2.set_ylabel("peak cgroup usage, MiB (page cache included)")
    ax2.set_title("peak memory-cgroup usage vs limit", fontsize=10)
    ax2.legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main -----------------------------------------------------------------------------------------
def parse_limits(s: str) -> list[int]:
    out = []
    for x in s.split(","):
        x = x.strip().lower().removesuffix("mib").removesuffix("mb")
        if x and x != "none":
            out.append(int(float(x)))
    return sorted(set(out), reverse=True)


RANDOM_PREDICTOR = "random: replayed picks pay a real predictor's DRAM and time (bench/limited_dram.py)"


def predictor_kind(folder: str) -> str | None:
    """None without a predictor file; "random" for one write_random_predictor wrote; else "fitted"."""
    from flashmem.checkpoints import safetensors_io as st

    path = os.path.join(folder, "predictor.safetensors")
    if not os.path.isfile(path):
        return None
    return "random" if st.read_header(path)[1].get("predictor") == RANDOM_PREDICTOR else "fitted"


def random_predictor_current(folder: str) -> bool:
    """Whether the folder's random predictor is of the kind calibrate would fit there now (default_rank)."""
    from flashmem.checkpoints import safetensors_io as st
    from flashmem.flash.calibrate import default_rank

    cfg = json.load(open(os.path.join(folder, "config.json")))
    meta = st.read_header(os.path.join(folder, "predictor.safetensors"))[1]
    return meta.get("rank", "0") == str(default_rank(cfg["hidden_size"], cfg["intermediate_size"]))


def write_random_predictor(folder: str) -> None:
    """A sparsity predictor of the folder's shapes with random values. With --replay-trace the picks
    come from the trace, but the engine loads this predictor (its DRAM counts against the budget)
    and runs it every token (set_trace(score=True)), so that a random-weight model pays what a
    fitted predictor would cost it (a model with weights to fit keeps its fitted one)."""
    import numpy as np

    from flashmem.checkpoints import safetensors_io as st
    from flashmem.flash.calibrate import Q8_BLOCK, Q8_BYTES, default_rank, predictor_specs, q8_0

    cfg = json.load(open(os.path.join(folder, "config.json")))
    d, ff, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "predictor.safetensors")
    rank = default_rank(d, ff)  # the kind calibrate would fit at these shapes
    specs = predictor_specs(n_layers, d, ff, rank)
    w = st.Writer(path + ".part", specs, {"predictor": RANDOM_PREDICTOR, "rank": str(rank)})
    for name, tag, shape in specs:
        if name.endswith("lowrank_in") or name.endswith("lowrank_out"):
            x = q8_0(rng.standard_normal((shape[0], shape[1] // Q8_BYTES * Q8_BLOCK), dtype=np.float32))
        elif name.endswith("outlier_dims"):
            x = np.sort(rng.choice(d, shape[0], replace=False)).astype(np.int32)
        elif tag == "u8":
            x = rng.integers(0, 256, shape, dtype=np.uint8)
        elif tag == "i8":
            x = rng.integers(-127, 128, shape, dtype=np.int8)
        else:
            x = (rng.uniform(0.5, 1.5, shape) / np.sqrt(d)).astype(np.float32)
        w.write(name, x)
    w.close()
    os.replace(path + ".part", path)


def prepare(a, modes, gguf, shared_text) -> dict:
    """Conversions, prompt, predictors: outside any limited group."""
    dtypes = sorted({"gguf"} | ({a.flash_dtype} if any(flash_mode(m) for m in modes) else set()))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, WORKER, "--prepare", "--gguf", gguf, "--dtypes", ",".join(dtypes),
                          "--text", shared_text, "--prompt-tokens", str(a.prompt_tokens)],
                         capture_output=True, text=True)
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if not line:
        raise SystemExit(f"preparation failed:\n{out.stderr[-3000:]}")
    prep = json.loads(line[len(RESULT_TAG):])
    print(f"prepared in {time.perf_counter() - t0:.0f} s: {prep['folders']}", flush=True)
    for dt, e in prep["errors"].items():
        print(f"conversion with dtype {dt} failed: {e}", file=sys.stderr)
    prep["calibration"], prep["traces"] = {}, {}
    folder = prep["folders"].get(a.flash_dtype)
    sparse = sorted({flash_mode(m)[1] for m in modes if flash_mode(m) and flash_mode(m)[1]})
    if folder and sparse and a.replay_trace:
        # every token a layer computes, warm-up and timed generation: no selection is replayed twice
        steps = 2 * len(prep["prompt"]) + min(4, a.new_tokens or 48) + (a.new_tokens or 48)
        for nn in sparse:
            path = os.path.join(folder, f"replay_trace_s{nn}_{steps}.npy")
            if not os.path.isfile(path) or not os.path.isfile(ahead_path(path)):
                print(f"replaying SmolLM2's selections at sparsity {nn}% onto {folder} ...", flush=True)
                c = subprocess.run([sys.executable, WORKER, "--make-trace", path, "--model", folder, "--sparsity",
                                    str(nn / 100), "--steps", str(steps), "--text", shared_text, "--threads",
                                    str(a.threads)], capture_output=True, text=True)
                if c.returncode:
                    raise SystemExit(f"making the replay trace failed:\n{c.stderr[-3000:]}")
            prep["traces"][nn] = path
        kind = predictor_kind(folder)
        if kind is None or (kind == "random" and not random_predictor_current(folder)):
            print(f"writing a random predictor of {folder}'s shapes (its cost, not its picks) ...", flush=True)
            write_random_predictor(folder)
        prep["predictor"] = predictor_kind(folder)
        from flashmem.flash.streaming import predictor_rank

        prep["predictor_rank"] = predictor_rank(os.path.join(folder, "predictor.safetensors"))
    elif folder and sparse:
        if predictor_kind(folder) != "fitted":  # none, or a random one written for replays
            print(f"fitting the sparsity predictor in {folder} (flashmem calibrate) ...", flush=True)
            c = subprocess.run([sys.executable, "-m", "flashmem.cli", "calibrate", folder, "--data", shared_text,
                                "--threads", str(a.threads)], capture_output=True, text=True)
            prep["calibration"] = {"returncode": c.returncode, "output": (c.stdout + c.stderr)[-1500:]}
            print(c.stdout.strip() or c.stderr[-1000:], flush=True)
        else:
            prep["calibration"] = {"existing": os.path.join(folder, "predictor.safetensors")}
    return prep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help="comma-separated; flashmem_flash_sNN for any sparsity NN%% (default: %(default)s)")
    ap.add_argument("--limits", default=None, help=f"MiB, comma-separated (default {DEFAULT_LIMITS}; "
                                                   "an unlimited run always comes first)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 48 (16 with --quick)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=512,
                    help="llama.cpp n_batch/n_ubatch (its compute buffer grows with it)")
    ap.add_argument("--flash-dtype", default="gguf",
                    help="flashmem dtype of the flash modes (default gguf; f16 works today)")
    ap.add_argument("--flash-budget", default="auto",
                    help='dram_budget of the flash modes: "auto" (the group\'s limit less its usage at load time, '
                         'page cache of the imported libraries included) or "limit-N": the limit less N MiB '
                         '("auto" without a limit)')
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run (default 300, 120 with --quick)")
    ap.add_argument("--skip-above-footprint", action="store_true",
                    help="do not run limits at or above a mode's unlimited peak cgroup usage")
    ap.add_argument("--model", default=None, help="GGUF file, or 'gemma3' for Gemma 3 270M Q4_K_M "
                    "(default: the shipped SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--quick", action="store_true", help=f"smoke test: limits {QUICK_LIMITS}, 16 new tokens")
    ap.add_argument("--name", default="limited_dram", help="results file name under bench/results/")
    ap.add_argument("--replay-trace", action="store_true",
                    help="sparse modes replay SmolLM2's predictor selections mapped onto the model (a model "
                         "without a predictor of its own: the 7B-class test model)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (memory cgroups, drop_caches)")
    new_tokens = a.new_tokens or (16 if a.quick else 48)
    timeout = a.timeout or (120.0 if a.quick else 300.0)
    limits = parse_limits(a.limits or (QUICK_LIMITS if a.quick else DEFAULT_LIMITS))
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ALL_MODES and not flash_mode(m):
            raise SystemExit(f"unknown mode {m!r}; modes: {', '.join(ALL_MODES)} (flashmem_flash_sNN, "
                             "flashmem_all_sNN for any NN, either with _hot for eviction 'hot', then _noahead "
                             "for read_ahead=0)")
    base = own_memory_cgroup()

    from common import ROOT

    from flashmem.checkpoints.default_model import default_gguf, gemma3_270m_gguf

    gguf = gemma3_270m_gguf() if a.model == "gemma3" else a.model or default_gguf()
    if not os.path.isfile(gguf):
        raise SystemExit(f"model not found: {gguf}")
    shared_text = os.path.join(os.environ.get("FLASHMEM_SHARED", str(ROOT.parent / "shared")), "data",
                               "tinyshakespeare.txt")
    prep = prepare(a, modes, gguf, shared_text)
    prompt = json.dumps(prep["prompt"])

    if a.flash_budget != "auto" and not (a.flash_budget.startswith("limit-")
                                         and a.flash_budget.removeprefix("limit-").isdigit()):
        raise SystemExit(f'--flash-budget must be "auto" or "limit-N" (N MiB), got {a.flash_budget!r}')

    def worker_args(mode, lim):
        budget = "auto"
        if lim is not None and a.flash_budget != "auto":
            budget = str(max(lim - int(a.flash_budget.removeprefix("limit-")), 1) * MIB)
        if mode.startswith("llamacpp"):
            model, dtype = gguf, "gguf"
        else:
            dtype = "gguf" if mode == "flashmem_dram" else a.flash_dtype
            model = prep["folders"].get(dtype) or gguf  # a failed conversion fails again in the run: recorded
        trace = prep["traces"].get(flash_mode(mode)[1]) if flash_mode(mode) else None
        return ["--model", model, "--dtype", dtype, "--prompt", prompt, "--new-tokens", str(new_tokens),
                "--threads", str(a.threads), "--max-context", str(a.max_context), "--n-batch", str(a.n_batch),
                "--dram-budget", budget] + (["--trace", trace] if trace else [])

    results = {m: {} for m in modes}  # mode -> limit label -> summary
    footprint, streak, stopped = {}, {m: 0 for m in modes}, set()
    n = 0
    t_start = time.perf_counter()
    for lim in [None] + limits:
        active = []
        for m in modes:
            if m in stopped:
                continue
            if lim is not None and a.skip_above_footprint and footprint.get(m) and lim >= footprint[m]:
                results[m][label(lim)] = {"limit_mb": lim, "status": "above_footprint",
                                          "message": f"limit >= unlimited peak {footprint[m]:.0f} MB; not run"}
                continue
            active.append(m)
        if not active:
            if all(m in stopped for m in modes):
                break
            continue
        runs = {m: [] for m in active}
        for _ in range(a.repeats):
            for m in active:
                n += 1
                r = run_one(base, f"limited_dram_{os.getpid()}_{n}", m, lim, worker_args(m, lim), timeout)
                runs[m].append(r)
                fig = (f"{r['decode_tok_s']:6.1f} tok/s decode, {r['prefill_tok_s']:6.1f} prefill"
                       if r["status"] == "ok" else f"{r['status']}: {r.get('message', '')[:150]}")
                extra = (f", {r['bytes_read_per_token'] / 1e6:.1f} MB read/token"
                         if r.get("bytes_read_per_token") is not None else
                         f", {r['disk_read_per_token'] / 1e6:.1f} MB read from disk/token"
                         if r.get("disk_read_per_token") is not None else "")
                print(f"[{time.perf_counter() - t_start:6.0f} s] {label(lim):>8} {m:>20}: {fig}{extra}; peak cgroup "
                      f"{r['peak_cgroup_mb'] or 0:.0f} MB, RSS {r.get('peak_rss_mb') or 0:.0f} MB, "
                      f"{r['wall_s']:.0f} s", flush=True)
        for m in active:
            s = summarize(runs[m])
            results[m][label(lim)] = s
            if lim is None and s.get("peak_cgroup_mb"):
                footprint[m] = s["peak_cgroup_mb"]
            streak[m] = streak[m] + 1 if s["status"] in FAILED else 0
            if streak[m] >= 2:
                stopped.add(m)
                print(f"{m}: failed at two successive limits; not going lower", flush=True)

    same_tokens(results, modes)
    io_bounds(results, prep["folders"], a.flash_dtype)
    columns = list(modes)
    if "llamacpp" in modes and "llamacpp_norepack" in modes:
        results["llamacpp_best"] = {k: best_of(results["llamacpp"].get(k), results["llamacpp_norepack"].get(k),
                                               ("llamacpp", "llamacpp_norepack"))
                                    for k in set(results["llamacpp"]) | set(results["llamacpp_norepack"])}
        columns.insert(modes.index("llamacpp_norepack") + 1, "llamacpp_best")

    config = {"model": os.path.basename(gguf), "modes": modes, "limits_mb": limits, "new_tokens": new_tokens,
              "prompt_tokens": len(prep["prompt"]), "repeats": a.repeats, "threads": a.threads,
              "max_context": a.max_context, "llama_n_batch": a.n_batch, "flash_dtype": a.flash_dtype,
              "flash_budget": a.flash_budget,
              "timeout_s": timeout, "quick": a.quick, "skip_above_footprint": a.skip_above_footprint,
              "mb": "MiB (2**20 bytes)", "cgroup_parent": base, "flashmem_folders": prep["folders"],
              "conversion_errors": prep["errors"], "calibration": prep["calibration"],
              "replay_traces": prep["traces"], "replay_predictor": prep.get("predictor")}
    out = {"benchmark": "limited_dram", "config": config, "machine": machine() | {"isa": prep.get("isa")},
           "footprint_mb": footprint, "columns": columns, "results": results,
           "total_s": time.perf_counter() - t_start}
    p = save(a.name, out)
    all_limits = [None] + limits
    md = table(results, columns, all_limits)
    try:
        plot(results, columns, all_limits, RESULTS / f"{a.name}.png",
             f"{os.path.basename(gguf)} (flash modes: dtype {a.flash_dtype}), {a.threads} threads, "
             f"{len(prep['prompt'])}-token prompt, {new_tokens} new tokens, median of {a.repeats}; "
             f"each run a fresh process in its own memory cgroup, page cache dropped before it")
    except Exception as e:  # noqa: BLE001 - the JSON is written already
        print(f"plot failed: {e}", file=sys.stderr)
    print()
    print(f"decode tok/s by memory limit ({new_tokens} new tokens; OOM = killed by the kernel, "
          f"timeout = over {timeout:.0f} s, error = the engine refused; (= none): limit above the unlimited peak):")
    print(md)
    print()
    print("peak cgroup MB by mode:", {m: {k: round(s["peak_cgroup_mb"]) for k, s in results[m].items()
                                         if s and s.get("peak_cgroup_mb")} for m in modes})
    diff = {f"{m} @ {k}": s["same_tokens"] for m in modes for k, s in results[m].items()
            if s and s.get("same_tokens") is not None and s["same_tokens"] < (s.get("new_tokens") or 0)}
    if diff:
        print(f"greedy tokens differ from the reference (leading equal tokens): {diff}")
    elif any(s and s.get("same_tokens") is not None for m in modes for s in results[m].values()):
        print("greedy tokens: every successful run produced the same tokens")
    errs = {f"{m} @ {k}": s["message"] for m in modes for k, s in results[m].items()
            if s and s["status"] in FAILED and s.get("message")}
    for k, v in errs.items():
        print(f"  {k}: {v[:300]}")
    print(f"wrote {p} and {a.name}.png")


if __name__ == "__main__":
    main()
