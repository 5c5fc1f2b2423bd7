"""Serving under load: flashmem's OpenAI-compatible server (`flashmem serve`, continuous batching)
beside llama-cpp-python's server (`python -m llama_cpp.server`) on the same GGUF file (the default
model, SmolLM2-135M-Instruct Q4_1), each alone on 127.0.0.1 with 2 threads and a 1024-token context.

    python bench/server_load.py [--engines flashmem,llama.cpp] [--concurrency 1,2,4,8,16]
        [--rates 2,4,8,16] [--rate-seconds 30] [--max-tokens 64] [--robust-requests 1000]
        [--skip-rates] [--skip-robust]
    python bench/server_load.py --concurrency 1,8 --skip-rates --robust-requests 100   # a short trial

Every request is a streamed chat completion (temperature 0, max_tokens --max-tokens, no
ignore_eos) whose prompt asks for writing at length; the ~50 prompts are built from templates and
lines of tinyshakespeare, and both engines get the same ones in the same order. Each server is
started, warmed up, measured and stopped before the next one starts (its whole process group is
killed on exit, Ctrl-C or error). The load generator is asyncio + httpx.

1. Concurrency sweep (closed loop): C clients (--concurrency) each send --per-client requests back
   to back (at least --min-requests in all). Reported per engine and C: aggregate completion tok/s
   (completion tokens / wall time from the first send to the last answer), p50/p99 time to first
   token (TTFT: to the first chunk with content), p50/p99 inter-token latency (ITL: gaps between
   content chunks), finish reasons. The key figure: aggregate tok/s at 8 clients, flashmem over
   llama.cpp (the target: >= 3x). Completion tokens: the server's usage (flashmem sends it with
   stream_options.include_usage); llama-cpp-python sends none in a stream, so its answers are
   re-tokenized with the model's tokenizer (the same tokenizer both servers use).
2. Request-rate sweep (open loop): Poisson arrivals at each rate (--rates, req/s) for
   --rate-seconds; an arrival that finds --max-inflight requests in flight is not sent (counted as
   "shed"); after the window the requests in flight may finish (up to --drain-seconds, then they
   are counted as timed out). Reported: p50/p99 TTFT (from the arrival) and ITL, achieved req/s
   and completion tok/s, errors, shed.
3. Robustness (flashmem only): --robust-requests requests (max_tokens 8-16) with --robust-inflight
   in flight: a tenth closed after their first 1-2 content chunks, a tenth invalid (negative
   max_tokens, temperature "hot", no messages, a body that is not JSON, n=2, an unknown field),
   which must get 400; every valid one must be answered completely (finish_reason, no error) and
   the server must stay up. The server's memory is read after a warm-up of 20 requests and after
   the load (once /health says nothing is pending): VmRSS from /proc/PID/status, and the usage of a
   memory cgroup (v1) made for the server process where one can be made (else RSS alone; the JSON
   says which). Target: the RSS after within 10% of the RSS before.

llama-cpp-python's server has no parallel decoding: one Llama object behind a lock serves one
request at a time (no continuous batching, no n_parallel/slots option). By default it also
*interrupts* a streaming request as soon as another one arrives (--interrupt_requests True: the
stream ends with [DONE] and no finish_reason), which truncates answers under concurrent load, so
this bench runs it with --interrupt_requests False (requests wait for the lock and are answered
completely). Also: --logits_all False (the server's default, True, computes and copies the logits
of every prompt token, which only logprobs need), --flash_attn True (its fastest attention here)
and --verbose False (no per-request timing prints); --llama-args replaces these. Requests to it
carry repeat_penalty 1.0 (its request default is 1.1; flashmem applies none), so that both engines
decode greedily (their texts agree for a while, then part at near ties, as kernels differ).

Writes bench/results/server_load.json and .png (aggregate tok/s against concurrency, p50 TTFT
against request rate).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare  # noqa: E402

HOST = "127.0.0.1"
ENGINES = ("flashmem", "llama.cpp")
CHAT = "/v1/chat/completions"
CGROUP_PREFIX = "flashmem-bench-"

TOPICS = ["a lighthouse keeper", "a lost robot", "a dragon who cannot fly", "a baker in Paris", "the last tree on Mars",
          "a detective cat", "a girl who talks to the wind", "an old sailor", "a clock that runs backwards",
          "a library at night", "a friendly ghost", "two rival chefs", "a village under the sea", "a brave mouse",
          "a time traveller's first day", "a forgotten toy", "a mountain guide", "the moon's day off",
          "a musician without a voice", "a city made of glass"]
TEMPLATES = ["Write a short story about {}.", "Tell me a long tale about {}, with many details.",
             "Describe, in several paragraphs, a day in the life of {}."]


def prompts(n: int = 50) -> list[str]:
    """~n prompts that make the model write at length: templates over topics, and requests to go on
    from lines of tinyshakespeare."""
    out = [t.format(topic) for topic in TOPICS for t in TEMPLATES][: (n * 3) // 5]
    lines = [ln.strip() for ln in shakespeare().splitlines() if len(ln.strip()) > 40 and not ln.strip().endswith(":")]
    rng = random.Random(0)
    for ln in rng.sample(lines, n - len(out)):
        out.append(f'Continue this passage in your own words, as a long story: "{ln}"')
    return out


def chat_body(prompt: str, max_tokens: int, engine: str) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    if engine == "flashmem":
        body["stream_options"] = {"include_usage": True}
    else:  # llama-cpp-python's request default is 1.1; flashmem's (and OpenAI's) is none: plain greedy for both
        body["repeat_penalty"] = 1.0
    return body


def pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- a memory cgroup (v1) for the server --------------------------------------------------------------
class MemCgroup:
    """A child of this process's own memory cgroup (v1), holding only the server process. `error`
    says why there is none (no v1 memory controller, no permission...)."""

    def __init__(self):
        self.path, self.error = None, None
        try:
            rel = next(line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
                       if line.split(":", 2)[1] == "memory")
            parent = "/sys/fs/cgroup/memory" + (rel if rel != "/" else "")
            if not os.path.isfile(os.path.join(parent, "memory.usage_in_bytes")):
                raise OSError(f"no cgroup v1 memory controller at {parent}")
            for stale in glob.glob(os.path.join(parent, CGROUP_PREFIX + "*")):  # left by a killed run
                with contextlib.suppress(OSError):
                    os.rmdir(stale)
            path = os.path.join(parent, f"{CGROUP_PREFIX}{os.getpid()}")
            os.mkdir(path)
            self.path = path
            with contextlib.suppress(OSError):  # charges made before the move go with the process
                self._write("memory.move_charge_at_immigrate", "3")
        except (OSError, StopIteration, IndexError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def _write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid: int) -> bool:
        if self.path is None:
            return False
        try:
            self._write("cgroup.procs", str(pid))
            return True
        except OSError as e:
            self.error = f"cannot move pid {pid} into {self.path}: {e}"
            return False

    def read(self) -> dict | None:
        if self.path is None or self.error:
            return None
        try:
            out = {"usage_bytes": int(open(os.path.join(self.path, "memory.usage_in_bytes")).read())}
            for line in open(os.path.join(self.path, "memory.stat")):
                k, v = line.split()
                if k in ("rss", "cache", "mapped_file", "total_rss", "total_cache"):
                    out[k] = int(v)
            return out
        except (OSError, ValueError) as e:
            return {"error": str(e)}

    def remove(self):
        if self.path is None:
            return
        for _ in range(50):  # the killed server may take a moment to leave
            try:
                os.rmdir(self.path)
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


# --- the servers ----------------------------------------------------------------------------------
class Server:
    """One server process (in its own process group), started and waited for; stop() kills the group."""

    def __init__(self, engine: str, model: str, a, log_dir: str, cgroup: MemCgroup | None = None):
        self.engine, self.port = engine, free_port()
        self.url = f"http://{HOST}:{self.port}"
        if engine == "flashmem":
            self.cmd = [sys.executable, "-m", "flashmem.cli", "serve", model, "--host", HOST, "--port", str(self.port),
                        "--max-batch", str(a.max_batch), "--max-context", str(a.max_context), "--threads",
                        str(a.threads)]
            self.ready_path = "/health"
        else:
            self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", HOST, "--port",
                        str(self.port), "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx",
                        str(a.max_context)] + shlex.split(a.llama_args)
            self.ready_path = "/v1/models"
        self.log_path = os.path.join(log_dir, f"{engine}.log")
        self.cgroup, self.proc = cgroup, None

    def start(self, timeout: float = 600.0):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        if self.cgroup is not None:
            self.cgroup.add(self.proc.pid)
        import httpx

        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{self.engine} server not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return open(self.log_path, errors="replace").read()[-n:]
        return ""

    def stop(self):
        if self.proc is None:
            return
        try:
            for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)
            with contextlib.suppress(ProcessLookupError):  # anything the server left in its group
                os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            self.log.close()


# --- one request ----------------------------------------------------------------------------------
async def stream_request(client, url: str, body=None, raw: bytes | None = None, start: float | None = None,
                         cancel_after: int | None = None) -> dict:
    """Sends one streamed chat completion and reads it as a client would. Times are measured from
    `start` (the request's arrival; default now). cancel_after: close the stream after that many
    content chunks."""
    start = time.perf_counter() if start is None else start
    rec = {"status": None, "ttft": None, "itl": [], "chunks": 0, "usage_tokens": None, "finish": None, "done": False,
           "error": None, "cancelled": False, "text": "", "start": start, "end": None}
    pieces, last = [], None
    try:
        content = raw if raw is not None else json.dumps(body).encode()
        async with client.stream("POST", url, content=content, headers={"Content-Type": "application/json"}) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec["done"] = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = json.dumps(obj["error"])[:300]
                    break
                if obj.get("usage"):
                    rec["usage_tokens"] = obj["usage"].get("completion_tokens")
                for ch in obj.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if rec["ttft"] is None:
                            rec["ttft"] = now - start
                        else:
                            rec["itl"].append(now - last)
                        last = now
                        rec["chunks"] += 1
                        pieces.append(piece)
                    if ch.get("finish_reason"):
                        rec["finish"] = ch["finish_reason"]
                if cancel_after is not None and rec["chunks"] >= cancel_after:
                    rec["cancelled"] = True
                    break  # leaving the block closes the connection mid-stream
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        rec["end"] = time.perf_counter()
        rec["text"] = "".join(pieces)
    return rec


def client(limit: int):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0),
                             limits=httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8))


class Counter:
    """Completion tokens of an answer: the server's usage when it sent one, else the answer re-tokenized."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, rec) -> int:
        if rec["usage_tokens"] is not None:
            return int(rec["usage_tokens"])
        return self.retokenized(rec)

    def retokenized(self, rec) -> int:
        return len(self.tok.encode(rec["text"], add_special_tokens=False)) if rec["text"] else 0


def ok(rec) -> bool:
    return rec["status"] == 200 and rec["error"] is None and rec["finish"] is not None and rec["done"]


def latency_stats(recs) -> dict:
    ttft = [r["ttft"] for r in recs if r["ttft"] is not None]
    itl = [g for r in recs for g in r["itl"]]
    return {"ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99), "itl_mean_s": float(np.mean(itl)) if itl else None}


def errors_of(recs) -> dict:
    out = {}
    for r in recs:
        if not ok(r):
            key = f"status {r['status']}" if r["status"] not in (None, 200) else \
                (r["error"] or "").split(":")[0] or ("no finish_reason" if r["done"] else "no [DONE]")
            out[key] = out.get(key, 0) + 1
    return out


def finishes(recs) -> dict:
    out = {}
    for r in recs:
        out[str(r["finish"])] = out.get(str(r["finish"]), 0) + 1
    return out


# --- 1. concurrency sweep -------------------------------------------------------------------------
async def concurrency_sweep(srv: Server, a, plist, count) -> list[dict]:
    url = srv.url + CHAT
    rows = []
    async with client(max(a.concurrency)) as c:
        for i in range(2):  # warm-up
            await stream_request(c, url, chat_body(plist[i], 8, srv.engine))
        for conc in a.concurrency:
            per = max(a.per_client, math.ceil(a.min_requests / conc))

            async def one_client(i):
                out = []
                for j in range(per):
                    body = chat_body(plist[(i * per + j) % len(plist)], a.max_tokens, srv.engine)
                    out.append(await stream_request(c, url, body))
                return out

            t0 = time.perf_counter()
            recs = [r for rs in await asyncio.gather(*(one_client(i) for i in range(conc))) for r in rs]
            wall = max(r["end"] for r in recs) - t0
            good = [r for r in recs if ok(r)]
            tokens = sum(count(r) for r in good)
            streamed = sum(count(r) for r in recs if r["status"] == 200)  # also answers cut short
            row = {"engine": srv.engine, "concurrency": conc, "requests": len(recs), "completed": len(good),
                   "errors": errors_of(recs), "finish_reasons": finishes(recs), "completion_tokens": tokens,
                   "retokenized_tokens": sum(count.retokenized(r) for r in good),
                   "content_chunks": sum(r["chunks"] for r in good), "wall_s": wall, "agg_tok_s": tokens / wall,
                   "streamed_tok_s": streamed / wall, "req_s": len(good) / wall,
                   "e2e_p50_s": median([r["end"] - r["start"] for r in good]) if good else None,
                   **latency_stats(good)}
            if not rows:  # what the engine wrote for the first prompts (both should write the same greedy text)
                row["sample_answers"] = [r["text"] for r in recs[:3]]
            rows.append(row)
            print(f"{srv.engine:>9} C={conc:<3} {row['agg_tok_s']:7.1f} tok/s  TTFT p50 {fmt_ms(row['ttft_p50_s'])} "
                  f"p99 {fmt_ms(row['ttft_p99_s'])}  ITL p50 {fmt_ms(row['itl_p50_s'])} p99 {fmt_ms(row['itl_p99_s'])}"
                  f"  {len(good)}/{len(recs)} ok {row['finish_reasons']}", flush=True)
    return rows


# --- 2. request-rate sweep ------------------------------------------------------------------------
async def rate_sweep(srv: Server, a, plist, count) -> list[dict]:
    url = srv.url + CHAT
    rows = []
    async with client(a.max_inflight) as c:
        for rate in a.rates:
            rng = random.Random(int(rate * 1000) + 7)
            arrivals, t = [], rng.expovariate(rate)
            while t < a.rate_seconds:
                arrivals.append(t)
                t += rng.expovariate(rate)
            tasks, shed, inflight = [], 0, [0]

            async def run(i, start):
                inflight[0] += 1
                try:
                    return await stream_request(c, url, chat_body(plist[i % len(plist)], a.max_tokens, srv.engine),
                                                start=start)
                finally:
                    inflight[0] -= 1

            t0 = time.perf_counter()
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if inflight[0] >= a.max_inflight:
                    shed += 1
                    continue
                tasks.append(asyncio.create_task(run(i, t0 + at)))
            done, pending = await asyncio.wait(tasks, timeout=a.drain_seconds) if tasks else (set(), set())
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            recs = [x.result() for x in tasks if x in done]
            good = [r for r in recs if ok(r)]
            end = max([r["end"] for r in recs], default=time.perf_counter())
            wall = end - t0
            tokens = sum(count(r) for r in good)
            row = {"engine": srv.engine, "rate": rate, "arrivals": len(arrivals), "sent": len(tasks), "shed": shed,
                   "timed_out": len(pending), "completed": len(good), "errors": errors_of(recs),
                   "finish_reasons": finishes(recs), "wall_s": wall, "achieved_req_s": len(good) / wall,
                   "achieved_tok_s": tokens / wall, "e2e_p50_s": pct([r["end"] - r["start"] for r in good], 50),
                   **latency_stats(good)}
            rows.append(row)
            print(f"{srv.engine:>9} {rate:5.1f} req/s: {row['achieved_req_s']:5.2f} req/s {row['achieved_tok_s']:7.1f} "
                  f"tok/s  TTFT p50 {fmt_ms(row['ttft_p50_s'])} p99 {fmt_ms(row['ttft_p99_s'])}  ITL p50 "
                  f"{fmt_ms(row['itl_p50_s'])} p99 {fmt_ms(row['itl_p99_s'])}  shed {shed} timed out "
                  f"{len(pending)} errors {row['errors']}", flush=True)
            if srv.engine == "flashmem":  # the next rate starts with an idle server
                await wait_idle(c, srv, 60)
    return rows


async def wait_idle(c, srv, timeout) -> dict | None:
    t0, h = time.time(), None
    while time.time() - t0 < timeout:
        with contextlib.suppress(Exception):
            h = (await c.get(srv.url + "/health")).json()
            if h.get("pending") == 0:
                return h
        await asyncio.sleep(0.2)
    return h


# --- 3. robustness (flashmem) ---------------------------------------------------------------------
INVALID = [
    ("negative max_tokens", lambda p: {"messages": [{"role": "user", "content": p}], "max_tokens": -5, "stream": True}),
    ("temperature 'hot'", lambda p: {"messages": [{"role": "user", "content": p}], "temperature": "hot",
                                     "stream": True}),
    ("no messages", lambda p: {"max_tokens": 8, "stream": True}),
    ("body not JSON", lambda p: b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,'),
    ("n=2", lambda p: {"messages": [{"role": "user", "content": p}], "n": 2, "max_tokens": 8, "stream": True}),
    ("unknown field", lambda p: {"messages": [{"role": "user", "content": p}], "max_tokens": 8, "stream": True,
                                 "bogus_field": 1}),
]


async def robustness(srv: Server, a, plist, cgroup: MemCgroup) -> dict:
    url = srv.url + CHAT
    rng = random.Random(1)
    async with client(a.robust_inflight) as c:
        warm = asyncio.Semaphore(4)

        async def warm_one(i):
            async with warm:
                return await stream_request(c, url, chat_body(plist[i % len(plist)], 16, "flashmem"))

        warm_recs = await asyncio.gather(*(warm_one(i) for i in range(a.warmup)))
        await wait_idle(c, srv, 30)
        await asyncio.sleep(1.0)
        mem_before = {"rss_kb": rss_kb(srv.proc.pid), "cgroup": cgroup.read()}
        health_before = (await c.get(srv.url + "/health")).json()

        n = a.robust_requests
        kinds = ["cancel"] * (n // 10) + ["invalid"] * (n // 10)
        kinds += ["valid"] * (n - len(kinds))
        rng.shuffle(kinds)
        sem = asyncio.Semaphore(a.robust_inflight)

        async def one(i, kind):
            async with sem:
                p = plist[i % len(plist)]
                if kind == "invalid":
                    name, make = INVALID[i % len(INVALID)]
                    b = make(p)
                    r = await stream_request(c, url, raw=b if isinstance(b, bytes) else json.dumps(b).encode())
                    r["invalid_kind"] = name
                elif kind == "cancel":
                    r = await stream_request(c, url, chat_body(p, rng.randint(8, 16), "flashmem"),
                                             cancel_after=1 + i % 2)
                else:
                    r = await stream_request(c, url, chat_body(p, rng.randint(8, 16), "flashmem"))
                r["kind"] = kind
                return r

        t0 = time.perf_counter()
        recs = await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
        wall = time.perf_counter() - t0
        health_after = await wait_idle(c, srv, 60)
        await asyncio.sleep(1.0)
        mem_after = {"rss_kb": rss_kb(srv.proc.pid), "cgroup": cgroup.read()}
        with contextlib.suppress(Exception):
            health_after = (await c.get(srv.url + "/health")).json()

    valid = [r for r in recs if r["kind"] == "valid"]
    cancel = [r for r in recs if r["kind"] == "cancel"]
    invalid = [r for r in recs if r["kind"] == "invalid"]
    outcomes = {
        "valid_completed": sum(ok(r) for r in valid),
        "valid_failed": sum(not ok(r) for r in valid),
        "cancelled_after_first_chunks": sum(r["cancelled"] for r in cancel),
        "cancel_ended_before_cancelling": sum((not r["cancelled"]) and ok(r) for r in cancel),
        "cancel_failed": sum((not r["cancelled"]) and not ok(r) for r in cancel),
        "invalid_400": sum(r["status"] == 400 for r in invalid),
        "invalid_other_status": sum(r["status"] != 400 for r in invalid),
    }
    by_invalid = {}
    for r in invalid:
        by_invalid.setdefault(r["invalid_kind"], {}).setdefault(str(r["status"]), 0)
        by_invalid[r["invalid_kind"]][str(r["status"])] += 1
    rb, ra = mem_before["rss_kb"], mem_after["rss_kb"]
    cb, ca = (mem_before["cgroup"] or {}).get("usage_bytes"), (mem_after["cgroup"] or {}).get("usage_bytes")
    res = {
        "requests": n, "inflight": a.robust_inflight, "wall_s": wall, "warmup_requests": a.warmup,
        "warmup_completed": sum(ok(r) for r in warm_recs), "outcomes": outcomes, "invalid_statuses": by_invalid,
        "valid_failures": [{k: r[k] for k in ("status", "error", "finish", "done", "chunks")}
                           for r in valid if not ok(r)][:20],
        "valid_finish_reasons": finishes(valid), "server_alive": srv.alive(),
        "health_before": health_before, "health_after": health_after,
        "memory_before": mem_before, "memory_after": mem_after,
        "rss_after_over_before": ra / rb if rb and ra else None,
        "cgroup_after_over_before": ca / cb if cb and ca else None,
        "memory_source": "VmRSS + memory cgroup (v1)" if cb else f"VmRSS only (no cgroup: {cgroup.error})",
    }
    res["pass"] = bool(outcomes["valid_failed"] == 0 and outcomes["invalid_other_status"] == 0
                       and outcomes["cancel_failed"] == 0 and res["server_alive"]
                       and res["rss_after_over_before"] is not None and res["rss_after_over_before"] <= 1.10)
    return res


# --- output ---------------------------------------------------------------------------------------
def fmt_ms(x) -> str:
    return "   -   " if x is None else f"{x * 1000:6.0f}ms" if x >= 0.0995 else f"{x * 1000:6.1f}ms"


def table(data):
    print("\n== concurrency sweep (closed loop, max_tokens %d) ==" % data["config"]["max_tokens"])
    print(f"{'engine':>9} {'C':>3} {'tok/s':>7} {'req/s':>6} {'TTFT p50':>8} {'p99':>8} {'ITL p50':>8} {'p99':>8}  ok")
    for r in data["concurrency"]:
        print(f"{r['engine']:>9} {r['concurrency']:>3} {r['agg_tok_s']:7.1f} {r['req_s']:6.2f} "
              f"{fmt_ms(r['ttft_p50_s'])} {fmt_ms(r['ttft_p99_s'])} {fmt_ms(r['itl_p50_s'])} {fmt_ms(r['itl_p99_s'])}  "
              f"{r['completed']}/{r['requests']}")
    for c, v in data["ratio_flashmem_over_llama"].items():
        print(f"aggregate tok/s flashmem / llama.cpp at C={c}: {v:.2f}x")
    if data.get("rates"):
        print("\n== request-rate sweep (open loop, Poisson) ==")
        print(f"{'engine':>9} {'rate':>5} {'sent':>5} {'shed':>4} {'req/s':>6} {'tok/s':>7} {'TTFT p50':>8} {'p99':>8} "
              f"{'ITL p50':>8} {'p99':>8} errors")
        for r in data["rates"]:
            print(f"{r['engine']:>9} {r['rate']:5.1f} {r['sent']:5d} {r['shed']:4d} {r['achieved_req_s']:6.2f} "
                  f"{r['achieved_tok_s']:7.1f} {fmt_ms(r['ttft_p50_s'])} {fmt_ms(r['ttft_p99_s'])} "
                  f"{fmt_ms(r['itl_p50_s'])} {fmt_ms(r['itl_p99_s'])} {sum(r['errors'].values()) + r['timed_out']}")
    rb = data.get("robustness")
    if rb:
        print(f"\n== robustness (flashmem, {rb['requests']} requests, {rb['inflight']} in flight, "
              f"{rb['wall_s']:.0f} s) ==")
        print("outcomes:", rb["outcomes"])
        print("invalid statuses:", rb["invalid_statuses"])
        mb, ma = rb["memory_before"], rb["memory_after"]
        print(f"VmRSS {mb['rss_kb'] / 1024:.1f} MiB -> {ma['rss_kb'] / 1024:.1f} MiB "
              f"(x{rb['rss_after_over_before']:.3f})" if rb["rss_after_over_before"] else "VmRSS: not read")
        if rb["cgroup_after_over_before"]:
            print(f"cgroup usage {mb['cgroup']['usage_bytes'] / 2**20:.1f} MiB -> "
                  f"{ma['cgroup']['usage_bytes'] / 2**20:.1f} MiB (x{rb['cgroup_after_over_before']:.3f})")
        else:
            print("memory:", rb["memory_source"])
        print("server alive:", rb["server_alive"], " pass:", rb["pass"])


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for eng, mk in zip(ENGINES, "os"):
        rows = [r for r in data["concurrency"] if r["engine"] == eng]
        if rows:
            ax1.plot([r["concurrency"] for r in rows], [r["agg_tok_s"] for r in rows], marker=mk, label=eng)
        rows = [r for r in data.get("rates") or [] if r["engine"] == eng and r["ttft_p50_s"] is not None]
        if rows:
            ax2.plot([r["rate"] for r in rows], [r["ttft_p50_s"] * 1000 for r in rows], marker=mk, label=eng)
    ax1.set_xscale("log", base=2)
    conc = sorted({r["concurrency"] for r in data["concurrency"]})
    ax1.set_xticks(conc, [str(c) for c in conc])
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("aggregate completion tok/s")
    ax1.set_title(f"closed loop, max_tokens {data['config']['max_tokens']}", fontsize=9)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("request rate (req/s, Poisson)")
    ax2.set_ylabel("p50 time to first token (ms)")
    ax2.set_title("open loop" if data.get("rates") else "open loop: not run", fontsize=9)
    if data.get("rates"):
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M Q4_1 served on {data['config']['threads']} threads "
                 f"({data['machine']['cores']}-core machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def on_sigterm(signum, frame):
    raise KeyboardInterrupt


def ints(s):
    return [int(x) for x in s.split(",") if x]


def floats(s):
    return [float(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="flashmem,llama.cpp")
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--concurrency", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--per-client", type=int, default=3, help="requests each client sends back to back")
    ap.add_argument("--min-requests", type=int, default=8, help="requests per concurrency level at least")
    ap.add_argument("--rates", type=floats, default=[2, 4, 8, 16])
    ap.add_argument("--rate-seconds", type=float, default=30)
    ap.add_argument("--max-inflight", type=int, default=64, help="open loop: arrivals beyond this are shed")
    ap.add_argument("--drain-seconds", type=float, default=300, help="open loop: wait after the window")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--robust-requests", type=int, default=1000)
    ap.add_argument("--robust-inflight", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=20, help="robustness: requests before memory is first read")
    ap.add_argument("--skip-rates", action="store_true")
    ap.add_argument("--skip-robust", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8, help="flashmem --max-batch")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--llama-args", help="extra llama_cpp.server flags",
                    default="--interrupt_requests False --logits_all False --flash_attn True --verbose False")
    a = ap.parse_args()
    engines = [e for e in a.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}: pick from {','.join(ENGINES)}")

    # a SIGTERM unwinds like Ctrl-C, so that the servers' process groups are killed
    signal.signal(signal.SIGTERM, on_sigterm)

    import flashmem
    from flashmem.checkpoints.default_model import default_gguf

    model = a.model or default_gguf()
    tok = flashmem.load(model, threads=1, max_context=16).tokenizer  # also converts the GGUF into the store once
    count = Counter(tok)
    plist = prompts()
    log_dir = tempfile.mkdtemp(prefix="server_load-")
    print(f"model {model}; server logs in {log_dir}", flush=True)

    data = {"machine": machine(), "model": model,
            "config": {"threads": a.threads, "max_context": a.max_context, "max_batch_flashmem": a.max_batch,
                       "max_tokens": a.max_tokens, "temperature": 0, "prompts": len(plist),
                       "per_client": a.per_client, "min_requests": a.min_requests, "rate_seconds": a.rate_seconds,
                       "max_inflight": a.max_inflight, "llama_args": a.llama_args,
                       "token_count": "flashmem: usage (stream_options.include_usage); llama.cpp: answer re-tokenized"},
            "commands": {}, "startup_s": {}, "concurrency": [], "rates": [], "ratio_flashmem_over_llama": {}}
    for eng in engines:
        srv = Server(eng, model, a, log_dir)
        data["commands"][eng] = " ".join(shlex.quote(x) for x in srv.cmd)
        try:
            data["startup_s"][eng] = srv.start()
            print(f"{eng} ready on {srv.url} in {data['startup_s'][eng]:.1f} s", flush=True)
            data["concurrency"] += asyncio.run(concurrency_sweep(srv, a, plist, count))
            if not a.skip_rates:
                data["rates"] += asyncio.run(rate_sweep(srv, a, plist, count))
            if not srv.alive():
                raise RuntimeError(f"{eng} server died:\n{srv.log_tail()}")
        finally:
            srv.stop()
    if "flashmem" in engines and not a.skip_robust and a.robust_requests > 0:
        cg = MemCgroup()
        srv = Server("flashmem", model, a, log_dir, cgroup=cg)
        try:
            srv.start()
            data["robustness"] = asyncio.run(robustness(srv, a, plist, cg))
            if not srv.alive():
                data["robustness"]["server_log_tail"] = srv.log_tail()
        finally:
            srv.stop()
            cg.remove()

    by = {(r["engine"], r["concurrency"]): r["agg_tok_s"] for r in data["concurrency"]}
    for c in a.concurrency:
        if ("flashmem", c) in by and ("llama.cpp", c) in by and by[("llama.cpp", c)] > 0:
            data["ratio_flashmem_over_llama"][str(c)] = by[("flashmem", c)] / by[("llama.cpp", c)]
    ratio8 = data["ratio_flashmem_over_llama"].get("8")
    data["target_3x_at_8"] = None if ratio8 is None else ratio8 >= 3
    p = save("server_load", data)
    plot(data, os.path.join(RESULTS, "server_load.png"))
    print(f"wrote {p}")
    table(data)


if __name__ == "__main__":
    main()
