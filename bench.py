"""
The bench of every stage (each script's --bench): time, peak memory and FLOPs of a step, and the table of
BENCHMARKS.md that `make bench-gpu` fills from the rows its benches append (nanoGPT's bench.py, shared).

    make bench-gpu                                      # every GPU row, each in its own process, then the table
    python bench.py runs/bench/bench.jsonl BENCHMARKS.md  # only the table, from rows already measured
"""
import json
import os
import resource
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn):
    """FLOPs (2 x multiply-adds) of fn(), attention included (SDPA's math path is counted; fused kernels are not)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def timed(fn, device, n):
    """Seconds of each of n calls of fn(), the device synchronised before and after each."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    stamps = [time.perf_counter()]
    for _ in range(n):  # the sync after a call is the one before the next
        fn()
        sync()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_bench(step_fn, flops_fn, batch, n, device, reference):
    """Time n training steps (after 3 warm-up ones: compile_s is what they took beyond 3 timed ones), report peak
    memory, FLOPs per step and the share of the measured matmul peak. flops_fn runs the step eagerly on ONE sample:
    the counter sees no compiled code, math attention on a whole batch would be huge, and FLOPs grow with the batch."""
    with torch.compiler.set_stance("force_eager"):
        flops = count_flops(flops_fn) * batch
    warm = sum(timed(step_fn, device, 3))
    if cuda := device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = 1000 * sorted(timed(step_fn, device, n))[n // 2]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else  # CPU: the process' peak resident memory
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)  # (Linux reports KiB)
    side, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)  # the matmul peak
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * side ** 3 / min(timed(lambda: a @ b, device, 6)[1:])  # FLOP/s
    result = dict(device=name, step_ms=round(ms, 2), compile_s=round(max(warm - 3 * ms / 1000, 0), 1),
                  peak_mem_gib=round(mem, 2), gflops_per_step=round(flops / 1e9, 1),
                  achieved_tflops=round(flops / ms / 1e9, 2), matmul_peak_tflops=round(peak / 1e12, 2),
                  fraction_of_matmul_peak=round(flops / (ms / 1000) / peak, 3), reference=reference)
    print(json.dumps(result, indent=1))
    return bench_record(batch=batch, **result)


def bench_record(**result):
    """Under `make bench-gpu` (BENCH_JSON set), append the result to its JSON lines as the row BENCH_ROW."""
    if os.environ.get("BENCH_JSON"):
        with open(os.environ["BENCH_JSON"], "a") as f:
            f.write(json.dumps(dict(row=os.environ.get("BENCH_ROW", " ".join(sys.argv)), **result)) + "\n")
    return result


def bench_table(jsonl, markdown):
    """Write `make bench-gpu`'s rows (one JSON object per line; {"row", "failed"} for a bench that failed or ran out
    of time) into the markdown file, between the lines <!-- bench-gpu --> and <!-- /bench-gpu -->."""
    lines = ["| step | batch | time | peak memory | share of matmul peak | device |", "|---|---|---|---|---|---|"]
    rows = [json.loads(line) for line in open(jsonl)]
    need = max([r["batch"] / r["step_ms"] * 1000 for r in rows if r["row"].startswith("DeltaTok") and "batch" in r],
               default=0)  # clips/s the fastest DeltaTok step eats: what the loader must feed
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['row']} | | failed or out of time (see the log) | | | |")
        elif "batch" in r:
            per = f" ({r['step_ms'] / r['batch']:.1f} ms per sequence)" if "sampling" in r["row"] else ""
            lines.append(f"| {r['row']} | {r['batch']} | **{r['step_ms']:.1f} ms**{per} | {r['peak_mem_gib']:.1f} "
                         f"GiB | {100 * r['fraction_of_matmul_peak']:.0f}% of {r['matmul_peak_tflops']:.0f} TFLOP/s | "
                         f"{r['device']} |")
        elif "clips_per_s" in r:  # the loader's (with workers: beside what it must feed) or the token cache's
            cells = f" (DeltaTok step: {need:.0f} clips/s) | | | cpu" if "workers" in r else " | | |"
            lines.append(f"| {r['row']} | | **{r['clips_per_s']:.0f} clips/s**{cells} |")
        else:  # eval's
            lines.append(f"| {r['row']} | | **{r.get('sequences_per_s', 0):.1f} sequences/s** | | | |")
    head, _, rest = open(markdown).read().partition("<!-- bench-gpu -->\n")
    tail = rest.partition("<!-- /bench-gpu -->")[2]
    with open(markdown, "w") as f:
        f.write(head + "<!-- bench-gpu -->\n" + "\n".join(lines) + "\n<!-- /bench-gpu -->" + tail)


if __name__ == "__main__":
    bench_table(*sys.argv[1:3])
