"""Records -> per-case results (speedups, roofline fractions) -> JSON, markdown table, PNG chart."""
import json
import os

from .roofline import roof_seconds
from .contenders import CONTENDERS, is_peer, ordered

SPEEDUPS = (("eager", "eager/vitk"), ("compile", "compile/vitk"), ("peer", "peer/vitk"))


def _peers(case):
    return [c for c in ordered(case["contenders"]) if is_peer(c)]


# ---------------------------------------------------------------- derived numbers
def _contender_result(rec: dict, roof_s: float) -> dict:
    keep = {k: v for k, v in rec.items() if k not in ("family", "case", "shape", "contender", "flops", "bytes")}
    if rec.get("status") == "ok":
        t = rec["median_ms"] / 1e3
        keep.update(gflops=rec["flops"] / t / 1e9, gbs=rec["bytes"] / t / 1e9, roofline_fraction=roof_s / t)
    return keep


def results(records, roof: dict, run_id: str) -> dict:
    """{family: {case: {...}}}; a contender run twice in one session keeps its last record."""
    out = {}
    for rec in records:
        fam = out.setdefault(rec["family"], {})
        roof_s, bound = roof_seconds(rec["flops"], rec["bytes"], roof) if roof else (None, None)
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


# ---------------------------------------------------------------- table
def _ms(v):
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _x(v):
    if v is None:
        return "-"
    return f"{v:.2g}x" if v < 10 else f"{v:.0f}x"


def _pct(v):
    if v is None:
        return "-"
    return f"{v:.1%}" if v < 0.1 else f"{v:.0%}"


def _cell(c, peer=False):
    if c is None:
        return "-"
    status = c.get("status")
    if status == "ok":
        t = _ms(c["median_ms"])
        return f"{c['label'].split()[0]} {t}" if peer else t
    reason = c.get("reason") or ""
    if status == "skipped":
        return "skipped: " + reason.split(" (")[0].split(",")[0]
    return f"{status}: {reason[:40]}"


def _mib(c):
    if c is None or c.get("status") != "ok" or c.get("peak_mib") is None:
        return "-"
    v = c["peak_mib"]
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


HEADER = ["family", "case", "shape", "vitk ms", "eager ms", "compile ms", "peer ms",
          "eager/vitk", "compile/vitk", "peer/vitk", "vitk % roofline", "peak MiB vitk/eager/compile/peer"]


def table(families: dict) -> str:
    rows = []
    for fam, cases in families.items():
        for name, case in cases.items():
            cs = case["contenders"]
            sp = case.get("speedups", {})
            vitk = cs.get("vitk") or {}
            # Several peers share the peer columns: "; " between them, in contender order.
            peers = _peers(case) or ["peer"]
            rows.append([fam, name, case["shape"], _cell(cs.get("vitk")), _cell(cs.get("eager")),
                         _cell(cs.get("compile")), "; ".join(_cell(cs.get(p), peer=True) for p in peers),
                         _x(sp.get("eager/vitk")), _x(sp.get("compile/vitk")),
                         "; ".join(_x(sp.get(f"{p}/vitk")) for p in peers),
                         _pct(vitk.get("roofline_fraction"))
                         + (f" ({case['bound']})" if vitk.get("roofline_fraction") else ""),
                         " / ".join(_mib(cs.get(c)) for c in [c for c in CONTENDERS if c != "peer"] + peers)])
    widths = [max(len(r[i]) for r in rows + [HEADER]) for i in range(len(HEADER))]
    line = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"   # noqa: E731
    return "\n".join([line(HEADER), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def roofline_line(roof: dict) -> str:
    if not roof:
        return "roofline: not measured"
    numpy = (f", numpy ({roof['numpy_blas']}) {roof['numpy_sgemm_gflops']:.0f}"
             if roof.get("numpy_sgemm_gflops") else "")
    return (f"roofline ({roof['device']}): {roof['bandwidth_gbs']:.1f} GB/s ({roof['copy_mib']} MiB copy_), "
            f"{roof['peak_gflops']:.0f} GFLOP/s fp32 = best sgemm {roof['sgemm_n']}^3 of torch "
            f"{roof['torch_sgemm_gflops']:.0f}{numpy}")


LEGEND = ("Times are medians (ms) after warm-up; speedups are other/vitk (>1: vitk is faster); "
          "vitk % roofline = max(FLOPs/peak, bytes/bandwidth) / vitk median, with the binding roof in "
          "parentheses; peak MiB = memory one call adds (CPU: RSS high-water mark growth).")


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Benchmarks on {m['slug']}", "",
             f"{m['cpu']}, {m['cores']} cores, {m.get('mem_total_gib')} GiB"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"; torch {m['torch']}, {m['torch_threads']} threads.", ""]
    for run_id, run in data["runs"].items():
        share = run.get("others_cpu_share")
        lines.append(f"- run {run_id}{' (--quick)' if run.get('quick') else ''}: {roofline_line(run['roofline'])}"
                     + (f"; other processes used {share:.0%} of the CPU meanwhile" if share is not None else ""))
    lines += ["", table(data["families"]), "", LEGEND, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- chart
def _no_eager_note(case):
    eager = case["contenders"].get("eager")
    if eager is None:
        return "eager\nnot run"
    return None if eager.get("status") == "ok" else f"eager\n{eager.get('status')}"


def chart(data: dict, path: str) -> None:
    """Grouped bars of eager median / contender median per case, on a log axis centred on 1x (bars
    grow up from 1x when faster than eager, down when slower)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    cases = [(f"{fam}\n{name}", case) for fam, cs in data["families"].items() for name, case in cs.items()]
    present = {c for _, case in cases for c in case["contenders"]}
    names = [c for c in ordered(present | set(CONTENDERS)) if c != "eager"]
    fig, ax = plt.subplots(figsize=(max(6, 1.7 * len(cases)), 4.5))
    width = 0.8 / len(names)
    values = []
    for i, c in enumerate(names):
        pts = [(j + (i - (len(names) - 1) / 2) * width, (case["contenders"].get(c) or {}).get("speedup_vs_eager"))
               for j, (_, case) in enumerate(cases)]
        pts = [(x, v) for x, v in pts if v]
        values += [v for _, v in pts]
        labels = {(case["contenders"].get(c) or {}).get("label") for _, case in cases} - {None}
        legend = f"{c} ({sorted(labels)[0].split()[0]})" if is_peer(c) and labels else c
        ax.bar([x for x, _ in pts], [v - 1 for _, v in pts], width, bottom=1, label=legend)
        for x, v in pts:
            ax.annotate(f"{v:.2g}x", (x, v), ha="center", va="bottom" if v >= 1 else "top", fontsize=7)
    for j, (_, case) in enumerate(cases):
        note = _no_eager_note(case)
        if note:
            ax.text(j, 1, note, ha="center", va="bottom", fontsize=8, color="0.4")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_ylim(lo / 1.6, hi * 1.6)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_ylabel("speedup vs eager reference")
    ax.set_xticks(range(len(cases)), [label for label, _ in cases], fontsize=8)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_title(f"{data['machine']['slug']}: eager median / contender median (higher is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
