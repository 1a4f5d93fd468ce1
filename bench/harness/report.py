"""Records -> per-case results (speedups, roofline fractions) -> the merged JSON -> per-family tables
and figures, and the results index that links them.

Layout under bench/results/:
    <machine>.json             the data: every case measured on that machine, merged by family/case
    <machine>/<family>.md      the family's table, under its figure
    <machine>/<family>.png     the family's figure (see figure.py)
    README.md                  links every machine's tables and figures, and says how to read them
Everything but the JSON is rendered from it (render_all), so it can be redrawn without a run.
"""
import glob
import json
import os

from .contenders import CONTENDERS, is_peer, ordered
from .roofline import roof_seconds

SPEEDUPS = (("eager", "eager/vitk"), ("compile", "compile/vitk"), ("peer", "peer/vitk"))
BASE_CONTENDERS = tuple(c for c in CONTENDERS if not is_peer(c))


def _peers(case):
    return [c for c in ordered(case["contenders"]) if is_peer(c)]


# ---------------------------------------------------------------- derived numbers
def _contender_result(rec: dict, roof_s: float) -> dict:
    keep = {k: v for k, v in rec.items()
            if k not in ("family", "case", "shape", "contender", "flops", "bytes", "int8_roof", "int8_gops",
                         "int8_peak_gops")}
    if rec.get("status") == "ok":
        t = rec["median_ms"] / 1e3
        keep.update(gflops=rec["flops"] / t / 1e9, gbs=rec["bytes"] / t / 1e9, roofline_fraction=roof_s / t)
        if rec.get("int8_roof") and rec.get("int8_gops"):
            keep["int8_fraction"] = rec["flops"] / (rec["int8_gops"] * 1e9) / t
        if rec.get("int8_roof") and rec.get("int8_peak_gops"):
            keep["int8_peak_fraction"] = rec["flops"] / (rec["int8_peak_gops"] * 1e9) / t
    return keep


def results(records, roof: dict, run_id: str) -> dict:
    """{family: {case: {...}}}; a contender run twice in one session keeps its last record."""
    out = {}
    for rec in records:
        fam = out.setdefault(rec["family"], {})
        roof_s, bound = roof_seconds(rec["flops"], rec["bytes"], roof) if roof else (None, None)
        if roof and rec.get("int8_roof"):
            rec = dict(rec, int8_gops=roof.get("int8_gops"), int8_peak_gops=roof.get("int8_peak_gops"))
        case = fam.setdefault(rec["case"], {"shape": rec["shape"], "flops": rec["flops"], "bytes": rec["bytes"],
                                            "roofline_ms": roof_s and roof_s * 1e3, "bound": bound,
                                            "run": run_id, "contenders": {}})
        case["contenders"][rec["contender"]] = _contender_result(rec, roof_s) if roof_s else dict(rec)
    for fam in out.values():
        for case in fam.values():
            _add_speedups(case)
    return out


def _median(case, name):
    c = case["contenders"].get(name)
    return c["median_ms"] if c and c.get("status") == "ok" else None


def _add_speedups(case: dict) -> None:
    vitk, eager = _median(case, "vitk"), _median(case, "eager")
    case["speedups"] = {}
    extra = [(c, f"{c}/vitk") for c in _peers(case) if c != "peer"]
    for name, key in SPEEDUPS + tuple(extra):
        other = _median(case, name)
        case["speedups"][key] = other / vitk if other and vitk else None
    for name, c in case["contenders"].items():
        mine = _median(case, name)
        c["speedup_vs_eager"] = eager / mine if eager and mine else None


# ---------------------------------------------------------------- JSON (merged by family/case)
def merge_json(path: str, new: dict, collector) -> dict:
    """Update `path` with this run's cases; cases of other families (or not run now) are kept, along
    with the run (roofline, torch version) they were measured in."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["machine"] = collector.machine
    run_id = collector.started
    runs = data.setdefault("runs", {})
    runs[run_id] = collector.run_info()
    fams = data.setdefault("families", {})
    for fam, cases in new.items():
        fams.setdefault(fam, {}).update(cases)
    used = {case["run"] for cases in fams.values() for case in cases.values()}
    data["runs"] = {k: v for k, v in runs.items() if k in used}
    data["latest_run"] = run_id
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, default=float)
    os.replace(tmp, path)                  # never leave a half-written results file
    return data


# ---------------------------------------------------------------- what a family's cases contain
def family_contenders(cases: dict):
    """Every contender that appears in any of the family's cases, in report order."""
    return ordered({c for case in cases.values() for c in case["contenders"]} | set(BASE_CONTENDERS))


def peer_labels(cases: dict) -> dict:
    """{peer contender: its library's label} from the first case in which it ran (a skipped peer
    records no label); the contender's own name when it never ran."""
    out = {}
    for c in family_contenders(cases):
        if is_peer(c):
            labels = [case["contenders"][c].get("label") for case in cases.values() if c in case["contenders"]]
            out[c] = next((lab for lab in labels if lab), c)
    return out


def short_name(contender: str, labels: dict) -> str:
    """The column and legend name of a contender: a peer's library ("faiss", "flex-pre")."""
    return labels[contender].split()[0] if is_peer(contender) else contender


def skip_text(c) -> str:
    """A contender that has no time: why, in a few words."""
    if c is None:
        return "not run"
    reason = c.get("reason") or ""
    if c.get("status") == "skipped":
        return "skipped: " + reason.split(" (")[0].split(",")[0]
    return f"{c.get('status')}: {reason[:40]}"


# ---------------------------------------------------------------- tables
def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def fmt_x(v):
    if v is None:
        return "-"
    return f"{v:.2g}x" if v < 10 else f"{v:.0f}x"


def fmt_pct(v):
    if v is None:
        return "-"
    return f"{v:.1%}" if v < 0.1 else f"{v:.0%}"


def _cell(c):
    return fmt_ms(c["median_ms"]) if c is not None and c.get("status") == "ok" else skip_text(c)


def _mib(c):
    if c is None or c.get("status") != "ok" or c.get("peak_mib") is None:
        return "-"
    v = c["peak_mib"]
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def roofline_cell(case) -> str:
    frac = (case["contenders"].get("vitk") or {}).get("roofline_fraction")
    return f"{fmt_pct(frac)} ({case['bound']})" if frac else "-"


def int8_cell(case, key="int8_fraction") -> str:
    frac = (case["contenders"].get("vitk") or {}).get(key)
    return fmt_pct(frac) if frac else "-"


def family_table(cases: dict) -> str:
    """One row per case: medians, speedups of vitk over each contender, vitk's roofline fraction and
    every contender's peak memory. Each peer has its own columns, named after its library."""
    names = family_contenders(cases)
    labels = peer_labels(cases)
    others = [c for c in names if c != "vitk"]
    short = {c: short_name(c, labels) for c in names}
    int8 = any((case["contenders"].get("vitk") or {}).get("int8_fraction") for case in cases.values())
    header = (["case", "shape"] + [f"{short[c]} ms" for c in names] + [f"{short[c]}/vitk" for c in others]
              + ["vitk % roofline"] + (["vitk % int8 ceiling", "vitk % int8 peak"] if int8 else [])
              + ["peak MiB " + "/".join(short[c] for c in names)])
    rows = []
    for name, case in cases.items():
        cs, sp = case["contenders"], case.get("speedups", {})
        rows.append([name, case["shape"]] + [_cell(cs.get(c)) for c in names]
                    + [fmt_x(sp.get(f"{c}/vitk")) for c in others]
                    + [roofline_cell(case)] + ([int8_cell(case), int8_cell(case, "int8_peak_fraction")] if int8 else [])
                    + [" / ".join(_mib(cs.get(c)) for c in names)])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"   # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def table(families: dict) -> str:
    """The console form: every family's table under its name."""
    return "\n\n".join(f"{fam}\n{family_table(cases)}" for fam, cases in families.items())


def roofline_line(roof: dict) -> str:
    if not roof:
        return "roofline: not measured"
    numpy = (f", numpy ({roof['numpy_blas']}) {roof['numpy_sgemm_gflops']:.0f}"
             if roof.get("numpy_sgemm_gflops") else "")
    int8 = (f"; int8 ceiling {roof['int8_gops']:.0f} GOP/s = torch._int_mm {roof['int8_n']}^3"
            if roof.get("int8_gops") else "")
    if roof.get("int8_peak_gops"):
        int8 += f"; int8 peak {roof['int8_peak_gops']:.0f} GOP/s ({roof['int8_peak_unit']} dot products, registers only)"
    return (f"roofline ({roof['device']}): {roof['bandwidth_gbs']:.1f} GB/s ({roof['copy_mib']} MiB copy_), "
            f"{roof['peak_gflops']:.0f} GFLOP/s fp32 = best sgemm {roof['sgemm_n']}^3 of torch "
            f"{roof['torch_sgemm_gflops']:.0f}{numpy}{int8}")


LEGEND = ("Times are medians (ms) after warm-up; speedups are other/vitk (>1: vitk is faster); "
          "vitk % roofline = max(FLOPs/peak, bytes/bandwidth) / vitk median, with the binding roof in "
          "parentheses; peak MiB = memory one call adds (CPU: RSS high-water mark growth).")


# ---------------------------------------------------------------- markdown pages
def machine_line(m: dict) -> str:
    isa = f" ({m['isa']})" if m.get("isa") else ""
    return (f"{m['cpu']}{isa}, {m['cores']} cores, {m.get('mem_total_gib')} GiB"
            + (f", {m['gpu']}" if m.get("gpu") else "") + f"; torch {m['torch']}, {m['torch_threads']} threads")


def _run_lines(data: dict, run_ids) -> list:
    lines = []
    for run_id in sorted(run_ids):
        run = data["runs"].get(run_id, {})
        share = run.get("others_cpu_share")
        lines.append(f"- run {run_id}{' (--quick)' if run.get('quick') else ''}: {roofline_line(run.get('roofline'))}"
                     + (f"; other processes used {share:.0%} of the CPU meanwhile" if share is not None else "")
                     + (f"; {run['allocator']}" if run.get("allocator") else ""))
    return lines


def family_markdown(data: dict, family: str, figure_name: str) -> str:
    cases = data["families"][family]
    slug = data["machine"]["slug"]
    return "\n".join(
        [f"# {family} on {slug}", "",
         f"![{family} on {slug}: speedup of vitk over each contender]({figure_name})", "",
         machine_line(data["machine"]) + ".", ""]
        + _run_lines(data, {case["run"] for case in cases.values()})
        + ["", family_table(cases), "", LEGEND, "", "How to read the figure and the table: [../README.md](../README.md).", ""])


READING = """\
## How to read them

- **Figure**: one group of bars per case; the left margin names the case, its shape and vitk's
  median time. Each bar is the speedup of vitk over one contender, that contender's median time
  divided by vitk's, on a log axis: right of the 1x line vitk is faster, left of it slower. A
  contender has the same colour in every figure (eager reference, torch.compile of the reference,
  then the family's peer libraries in their order); one that did not run says why in place of its bar.
- **Roofline** (the figure's right panel, the tables' `vitk % roofline`): how close vitk comes to
  what the machine could possibly do for the case, `max(FLOPs / peak FLOP/s, minimal bytes /
  bandwidth) / vitk's median`, with the roof that binds in parentheses. Peak FLOP/s (best fp32
  sgemm of torch and numpy) and bandwidth (a large `copy_`) are measured at the start of each run
  and listed above each table. FLOPs count only useful arithmetic and bytes only inputs and
  outputs, so 100% is unreachable: the fraction is a lower bound.
- **Tables**: medians in ms after warm-up (min, IQR and rounds are in the JSON); `X/vitk` columns
  are the figure's speedups; `peak MiB` is the memory one call adds (CPU: growth of the RSS
  high-water mark; CUDA: `max_memory_allocated`), which is where an N x K matrix shows up.
- `skipped: needs 52.4 GB`: not attempted, because the memory its case declares exceeds what the
  device has free; `skipped: no cpu backward`: the peer cannot run that case here; `error: ...`:
  it ran and failed.
- Each run line says how much of the CPU other processes used meanwhile: above a few percent they
  slowed contenders and the roofline measurement unevenly, and the numbers are not to be trusted.
- `python bench/run.py --family <family>` reruns a family and merges it into the machine's JSON;
  `python bench/run.py --render-only` redraws every figure, table and this page from the JSON files
  without running anything.
"""


def index_markdown(machines) -> str:
    """machines: [(data, {family: (table path, figure path)})], paths relative to the results folder."""
    lines = ["# Benchmark results", "",
             "Each machine's `<machine>.json` holds every case measured on it, merged by family and case: it is",
             "the data, and everything linked here is rendered from it.", "",
             "| machine | family | cases | table | figure |", "|---|---|---|---|---|"]
    for data, pages in machines:
        m = data["machine"]
        who = f"`{m['slug']}` ({machine_line(m)})"
        for family, (md, png) in pages.items():
            lines.append(f"| {who} | {family} | {len(data['families'][family])} | [{md}]({md}) | [{png}]({png}) |")
            who = ""
    return "\n".join(lines + ["", READING])


# ---------------------------------------------------------------- rendering
def render_machine(json_path: str) -> tuple:
    """Writes <machine>/<family>.md and .png next to json_path; (data, {family: (md, png)}) with
    paths relative to the results folder."""
    from .figure import family_figure
    with open(json_path) as f:
        data = json.load(f)
    root = os.path.dirname(os.path.abspath(json_path))
    slug = os.path.basename(json_path)[:-len(".json")]
    os.makedirs(os.path.join(root, slug), exist_ok=True)
    pages = {}
    for family in data["families"]:
        md, png = f"{slug}/{family}.md", f"{slug}/{family}.png"
        family_figure(data, family, os.path.join(root, png))
        with open(os.path.join(root, md), "w") as f:
            f.write(family_markdown(data, family, os.path.basename(png)))
        pages[family] = (md, png)
    return data, pages


def machine_jsons(results_dir: str):
    return sorted(p for p in glob.glob(os.path.join(results_dir, "*.json")) if not p.endswith(".raw.json"))


def render_all(results_dir: str) -> list:
    """Every machine's figures and tables, and the index README.md; returns the paths written."""
    machines = [render_machine(p) for p in machine_jsons(results_dir)]
    with open(os.path.join(results_dir, "README.md"), "w") as f:
        f.write(index_markdown(machines))
    written = [os.path.join(results_dir, p) for _, pages in machines for pair in pages.values() for p in pair]
    return written + [os.path.join(results_dir, "README.md")]
