#!/usr/bin/env python
"""Run the vitkernels microbenchmarks and print one table; `make bench` calls this.

    python bench/run.py [--family codebook] [--quick] [--device cpu|cuda] [-- extra pytest args, e.g. -k FQGAN]
    python bench/run.py --render-only       redraw bench/results/ from its JSON files; runs nothing

Each bench/<family>.py declares its cases; every case is timed with up to four contenders in the
same process, on the same inputs (fixed seed, random normal), all threads:
  vitk      torch.ops.vitk.* (the op under test)
  eager     the plain-PyTorch reference in vitkernels.reference (what the models' own code does)
  compile   torch.compile(reference), compiled and warmed up before timing (compile_s in the JSON)
  peer      a third-party library solving the same problem, when the family has one (codebook: faiss;
            spectral: pytorch_wavelets; lowbit: fp32 and bf16 F.linear, fbgemm's dynamic int8 Linear)
Every contender's output is checked against an fp64 ground truth before it is timed: a broken
kernel fails its item instead of producing a number.

Reading the table
  * "<x> ms" columns are medians over the timed rounds, after warm-up (min and IQR in the JSON).
  * eager/vitk, compile/vitk, faiss/vitk, ...: the other's median divided by vitk's; above 1x vitk
    wins. A peer's columns carry its library's name; the table has one section per family.
  * vitk % roofline: how close vitk is to what this machine could possibly do for the case:
    time_roofline = max(FLOPs / peak FLOP/s, minimal bytes / bandwidth), fraction = time_roofline /
    vitk's median. Peak FLOP/s and bandwidth are measured at the start of the run (best fp32 sgemm of
    torch and numpy; a large copy_), shown in the line above the table; "(memory)" or "(compute)"
    says which roof binds. FLOPs count only the useful arithmetic (2*N*K*D for a distance search),
    bytes only the inputs and outputs, so 100% is unreachable and the number is a lower bound.
  * peak MiB: memory one call adds, per contender (CPU: growth of the RSS high-water mark;
    CUDA: max_memory_allocated). This is where materializing an N x K matrix shows up.
  * "skipped: needs 52.4 GB": the contender was not attempted because the memory its case declares
    for it exceeds what the device has free. "error: ..." means it ran and failed (pytest's output
    above the table has the traceback); "error: out of memory" means it allocated far beyond its
    declaration and hit the address-space cap the harness sets around each call (CPU), which
    keeps one runaway contender from OOM-killing the whole run.
  * A warning under the table says when other processes used a noticeable share of the CPU during
    the run (measured from /proc/stat): they slow contenders and the roofline measurement unevenly,
    so rerun on an idle machine before trusting speedups or roofline fractions.
  * -k selects pytest items by substring of "<case>-<contender>" ids, case-insensitively: note that
    "-k vit" also matches every "-vitk" item; use "-k ViT-VQGAN".

Outputs (unless --quick without --save), in bench/results/: <machine>.json, the data (merged by
family/case, so running one family keeps the others); rendered from it, one table and one figure per
family, <machine>/<family>.md and .png, and README.md, which links them for every machine and says
how to read them; <machine>.raw.json, pytest-benchmark's per-round data (not committed).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pytest  # noqa: E402

from harness import machine, report  # noqa: E402
from harness.session import Collector  # noqa: E402

NOT_FAMILIES = {"run.py", "conftest.py"}


def families():
    return sorted(f[:-3] for f in os.listdir(HERE)
                  if f.endswith(".py") and f not in NOT_FAMILIES and not f.startswith("_"))


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Arguments after -- go to pytest.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=families(),
                    help="run only this family (repeatable); default: all of " + ", ".join(families()))
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke run; results are not saved")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:n]")
    ap.add_argument("--save", action=argparse.BooleanOptionalAction, default=None,
                    help="write bench/results/ (default: yes, except with --quick)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--render-only", action="store_true",
                    help="only redraw the tables, figures and README.md of --results-dir from its JSON files")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = ap.parse_args(argv)
    args.pytest_args = extra
    if args.save is None:
        args.save = not args.quick
    return args


def render(results_dir: str) -> None:
    written = report.render_all(results_dir)
    print(f"wrote {len(written)} files under {results_dir}: per-family tables and figures, README.md")


def main(argv=None) -> int:
    args = parse(argv)
    if args.render_only:
        render(args.results_dir)
        return 0
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    names = args.family or families()
    slug = machine.slug(args.device)
    os.makedirs(args.results_dir, exist_ok=True)
    base = os.path.join(args.results_dir, slug)

    collector = Collector()
    collector.external = True
    pytest_args = [os.path.join(HERE, f"{n}.py") for n in names]
    pytest_args += ["-p", "no:cacheprovider", "-v", "-r", "fE", "--tb=short", "--benchmark-quiet",
                    "-W", "ignore::DeprecationWarning",
                    "-W", "ignore:Benchmark fixture was not used",      # items that failed before timing
                    "--vitk-device", args.device]
    if args.quick:
        pytest_args.append("--vitk-quick")
    if args.save:
        pytest_args.append(f"--benchmark-json={base}.raw.json")
    start = time.perf_counter()
    rc = pytest.main(pytest_args + args.pytest_args, plugins=[collector])
    elapsed = time.perf_counter() - start
    collector.cpu_end = machine.cpu_snapshot()

    if not collector.records:
        print(f"no benchmark ran (pytest exit code {int(rc)})")
        return int(rc) or 1
    results = report.results(collector.records, collector.roofline, collector.started)
    print()
    print(report.roofline_line(collector.roofline))
    print(report.table(results))
    print(report.LEGEND)
    print(f"total {elapsed:.0f} s{' (--quick: indicative only)' if args.quick else ''}")
    if collector.busy_warning():
        print(collector.busy_warning())
    if args.save:
        report.merge_json(base + ".json", results, collector)
        print(f"wrote {base}.json")
        render(args.results_dir)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
