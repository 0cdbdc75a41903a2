"""``python -m benchmarks``: every op × size × backend, timed against the reference in the same run.

For each case (op, size) the inputs are built once and shared by the backends. Each backend is
warmed up, then the backends are timed in interleaved rounds (round r starts at backend r mod k:
ABC, BCA, CAB, ...), each round timing one forward+backward and one forward per backend, so that
a change of machine load falls on all of them alike. Medians are reported, with the speed-up
against the reference (``torch``) measured in the same rounds; all raw timings go to the JSON.
Then the memory beyond the fields and their gradients is measured (see ``measure.py``) and, on
CUDA, the achieved bandwidth. The JSON is rewritten after every case, so an interrupted run
keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from . import cases as C
from . import environment, measure, report

SCHEMA = 1


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time and measure gradicon_fast's ops on every backend against the PyTorch reference "
                    "(see BENCHMARKS.md).")
    p.add_argument("--ops", type=_csv, default=None,
                   help=f"comma-separated ops out of {', '.join(C.OPS)} (default: all the API supports)")
    p.add_argument("--sizes", type=_csv, default=["small"],
                   help=f"comma-separated sizes (default small): presets {', '.join(f'{k}={v}' for k, v in C.PRESETS.items())} "
                        "or integers N (chain fields at N/4, N/2, N, N cubed, loss/image grid N cubed)")
    p.add_argument("--backends", type=_csv, default=None,
                   help="comma-separated backends (default: the reference plus every fused backend available for "
                        "the device); the reference 'torch' is always added, speed-ups are relative to it")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device of the tensors (default: cuda if available, else cpu)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed rounds per case (default by size: 3 tiny, 10 small, 5 medium, 3 lung)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per backend (default by size: 1-2)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the fields (and image); default 1")
    p.add_argument("--compile", action="store_true",
                   help=f"add the reference under torch.compile as backend '{C.COMPILED}'")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--amplitude", type=float, default=0.03, help="peak displacement of each random field, [0,1] units (default 0.03)")
    p.add_argument("--explicit-noise", action="store_true",
                   help="pass a pre-drawn noise tensor to the penalties instead of a generator")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/<device>.json)")
    p.add_argument("--markdown", nargs="?", const=report.MARKDOWN, type=Path, default=None, metavar="FILE",
                   help="print the markdown table and rewrite the results section of FILE (default BENCHMARKS.md) "
                        "from every results JSON beside --output")
    p.add_argument("--note", default="", help="free text stored in the JSON and shown in the markdown heading")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


class Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def _error(exc: BaseException, phase: str) -> dict:
    return {"status": "error", "phase": phase, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=6)}


def benchmark_case(case: C.Case, backends: list[str], repeat: int, warmup: int, args, copy_gbps: float | None,
                   log: Log) -> dict:
    device = case.device
    inputs = case.build()
    counts = C.byte_counts(case, inputs)
    entry = {"op": case.op, "size": case.size.to_dict(), "batch": case.batch, "case": case.to_dict(),
             "description": case.describe(), **counts, "repeat": repeat, "warmup": warmup, "results": {}}
    results = entry["results"]
    runs = {}
    for b in backends:
        try:
            runs[b] = C.make_callables(case, inputs, b)
        except Exception as exc:
            results[b] = _error(exc, "setup")
    for b in list(runs):
        record = results[b] = {"status": "ok", "warmup_s": []}
        try:
            for i in range(warmup):
                record["warmup_s"].append(measure.time_call(runs[b].forward_backward, device))
                measure.time_call(runs[b].forward, device)
        except Exception as exc:
            results[b] = _error(exc, "warm-up")
            del runs[b]
            log(f"  {b}: failed in warm-up: {results[b]['error']}")
    active = list(runs)
    for b in active:
        results[b].update({"fwd_bwd_s": [], "fwd_s": []})
    for r in range(repeat):
        k = r % len(active) if active else 0
        for b in active[k:] + active[:k]:
            if b not in runs:
                continue
            try:
                results[b]["fwd_bwd_s"].append(measure.time_call(runs[b].forward_backward, device))
                results[b]["fwd_s"].append(measure.time_call(runs[b].forward, device))
            except Exception as exc:
                results[b] = _error(exc, "timing")
                del runs[b]
                log(f"  {b}: failed while timed: {results[b]['error']}")
    for b in runs:
        rec = results[b]
        for key in ("fwd_bwd", "fwd"):
            rec.update(measure.summary(rec[f"{key}_s"], key))
    ref = results.get(C.REFERENCE, {})
    for b in runs:
        rec = results[b]
        for key in ("fwd_bwd", "fwd"):
            mine, theirs = rec.get(f"{key}_median_s"), ref.get(f"{key}_median_s")
            rec[f"speedup_{key}"] = theirs / mine if mine and theirs else None

    for b in runs:
        rec = results[b]
        if args.no_memory:
            rec["memory"] = None
        elif device == "cuda":
            try:
                rec["memory"] = measure.cuda_memory(runs[b].forward_backward, counts["grad_bytes"],
                                                    counts["field_bytes"])
            except Exception as exc:
                rec["memory"] = {"method": "cuda-max-memory-allocated", "supported": False,
                                 "error": f"{type(exc).__name__}: {exc}"}
        else:
            log(f"  memory probe (subprocess): {b}")
            rec["memory"] = measure.cpu_memory_subprocess(case.to_dict(), b, torch.get_num_threads())
        rec["bandwidth"] = (measure.bandwidth(counts["moved_bytes_fwd"], counts["moved_bytes_fwd_bwd"],
                                              rec["fwd_median_s"], rec["fwd_bwd_median_s"], copy_gbps)
                            if device == "cuda" else None)
        log(f"  {b:>14}: fwd+bwd {report._ms(rec['fwd_bwd_median_s'])} ms, fwd {report._ms(rec['fwd_median_s'])} ms,"
            f" speed-up {report._ratio(rec['speedup_fwd_bwd'])}, extra MB {report._mb(rec.get('memory'))[0]}")
    del runs, inputs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return entry


def resolve_backends(requested: list[str] | None, device: str, compile_: bool) -> tuple[list[str], dict]:
    """(backends to run, {backend: reason} for those requested but not runnable here)."""
    names = list(requested) if requested is not None else C.default_backends(device)
    if compile_ and C.COMPILED not in names:
        names.append(C.COMPILED)
    if C.REFERENCE not in names:
        names.insert(0, C.REFERENCE)
    names = list(dict.fromkeys(names))
    skipped = {}
    for name in list(names):
        reason = C.backend_runnable(name, device)
        if reason is not None:
            skipped[name] = reason
            names.remove(name)
    return names, skipped


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")
    tmp.replace(path)


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    sizes = [C.parse_size(s) for s in args.sizes]
    ops = args.ops if args.ops is not None else C.default_ops()
    unknown = [op for op in ops if op not in C.OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(C.OPS)}")
    backends, skipped = resolve_backends(args.backends, device, args.compile)
    log = Log(args.quiet)
    env = environment.describe(device)
    output = args.output or report.RESULTS_DIR / f"{env['device_name']}.json"
    repeat_by_size, warmup_by_size = {}, {}
    for size in sizes:
        r, w = size.default_repeat_warmup()
        repeat_by_size[size.label] = args.repeat if args.repeat is not None else r
        warmup_by_size[size.label] = args.warmup if args.warmup is not None else w
    result = {
        "schema": SCHEMA,
        "device": env["device_name"],
        "environment": env,
        "config": {"ops": ops, "sizes": [s.to_dict() for s in sizes], "backends": backends,
                   "unavailable_backends": skipped, "batch": args.batch, "repeat_by_size": repeat_by_size,
                   "warmup_by_size": warmup_by_size, "compile": args.compile, "amplitude": args.amplitude,
                   "explicit_noise": args.explicit_noise, "seed": args.seed, "memory": not args.no_memory,
                   "note": args.note, "command": " ".join(["python -m benchmarks"] + sys.argv[1:])},
        "copy_bandwidth": None,
        "cases": [],
    }
    for name, reason in skipped.items():
        log(f"backend {name} skipped: {reason}")
    copy_gbps = None
    if device == "cuda":
        result["copy_bandwidth"] = measure.copy_bandwidth()
        copy_gbps = result["copy_bandwidth"]["gb_per_s"]
        log(f"copy bandwidth {copy_gbps:,.0f} GB/s")
    total = len(sizes) * len(ops)
    i = 0
    for size in sizes:
        for op in ops:
            i += 1
            case = C.Case(op=op, size=size, batch=args.batch, device=device, amplitude=args.amplitude,
                          explicit_noise=args.explicit_noise, seed=args.seed)
            log(f"[{i}/{total}] {case.name}: {case.describe()['detail']}; backends {', '.join(backends)}")
            result["cases"].append(benchmark_case(case, backends, repeat_by_size[size.label],
                                                  warmup_by_size[size.label], args, copy_gbps, log))
            write_json(output, result)
    write_json(output, result)
    result["output"] = str(output)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    output = Path(result.pop("output"))
    print(report.console_table(result))
    print(f"\nresults: {output}")
    if args.markdown is not None:
        print()
        print(report.markdown_section(result))
        files = report.result_files(output.parent)
        if output.resolve() not in [f.resolve() for f in files]:
            files.append(output)
        report.update_markdown(args.markdown, report.markdown(report.load(files)))
        print(f"\nupdated {args.markdown}")
    return 0
