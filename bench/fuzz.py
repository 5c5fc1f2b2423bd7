"""The long fuzzing campaign of issue 18: every format flashmem reads, mutated in its structure
(tests/fuzz_targets.py), loaded through the public API in child processes that may crash or hang.

    nice -n 19 python bench/fuzz.py --cases 10000                  # every format, 2 jobs
    python bench/fuzz.py --cases 500 --formats gguf,bank --jobs 1 --first 20000

Prints one line per format and writes the summary (cases, exceptions by type, crashes, hangs,
out-of-memory and unexpected exception types, each with its seed; seconds, cases per second) to
bench/results/fuzz.json. The input of each finding is saved to --save (tests/fuzz_regressions by
default) as <format>-<seed>.bin/.json, which tests/test_fuzz.py replays. Exit status 1 when
anything was found. --minutes bounds the whole run (the time is split evenly between formats).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fuzz_targets as ft  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000, help="cases per format")
    ap.add_argument("--formats", default=",".join(ft.FORMATS), help=f"comma-separated, of {', '.join(ft.FORMATS)}")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes per format")
    ap.add_argument("--first", type=int, default=0, help="the first case seed (cases are seeds first..first+cases-1)")
    ap.add_argument("--minutes", type=float, default=None, help="time limit of the whole run")
    ap.add_argument("--seeds", default=os.path.join(tempfile.gettempdir(), "flashmem-fuzz-seeds"),
                    help="folder of the seed files (built once)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--save", default=ft.REGRESSIONS, help="where the inputs of findings go ('' : nowhere)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fuzz.json"))
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in ft.FORMATS]
    if bad:
        ap.error(f"unknown formats {bad}; known: {', '.join(ft.FORMATS)}")

    t0 = time.monotonic()
    ft.build_seeds(args.seeds)
    print(f"seeds in {args.seeds} ({time.monotonic() - t0:.0f} s)", flush=True)
    work = args.work or tempfile.mkdtemp(prefix="flashmem-fuzz-")
    results = {"command": " ".join(sys.argv), "cases_per_format": args.cases, "first_seed": args.first,
               "jobs": args.jobs, "cpu_limit_s": ft.CPU_LIMIT, "memory_limit_bytes": ft.MEMORY_LIMIT,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "formats": {}}
    start = time.monotonic()
    last = [0.0]

    def progress(fmt, s):
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"  {fmt}: {s['cases']} cases, {ft.findings(s)} findings", flush=True)

    found = 0
    for i, fmt in enumerate(formats):
        deadline = None
        if args.minutes:  # what is left, shared by the formats still to run
            left = start + 60 * args.minutes - time.monotonic()
            deadline = time.monotonic() + left / (len(formats) - i)
        s = ft.run_cases(fmt, range(args.first, args.first + args.cases), args.seeds, os.path.join(work, fmt),
                         jobs=args.jobs, deadline=deadline, save_to=args.save or None, progress=progress)
        for entry in s["crashes"] + s["hangs"]:  # the end of the worker's log (whole in the work folder)
            entry["log"] = entry["log"][-1500:]
        results["formats"][fmt] = s
        found += ft.findings(s)
        print(f"{fmt}: {s['cases']} cases in {s['seconds']} s ({s['cases_per_second']}/s): ok {s['ok']}, "
              f"crashes {len(s['crashes'])}, hangs {len(s['hangs'])}, oom {len(s['oom'])}, "
              f"unexpected {len(s['unexpected']) + len(s['baseexception'])}; exceptions {s['exceptions']}",
              flush=True)
    results["seconds"] = round(time.monotonic() - start, 1)
    results["findings"] = found
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"{found} findings; summary in {args.out}; logs in {work}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
