"""One figure per family: how much faster vitk is than each contender, case by case, and how close
vitk comes to the machine's roofline.

Left panel: a group of horizontal bars per case, one bar per contender other than vitk, the length
being contender median / vitk median on a log axis around a line at 1x (right of it, vitk is
faster). Right panel: vitk's roofline fraction for the same cases.
"""
from .contenders import is_peer, peer_index
from .report import family_contenders, fmt_ms, fmt_x, peer_labels, roofline_cell, skip_text

# A contender keeps its colour in every figure; peers take the peer colours in their order.
COLOURS = {"eager": "#4c72b0", "compile": "#dd8452"}
PEER_COLOURS = ("#55a868", "#c44e52", "#8172b3", "#937860")
ROOF_COLOUR = "0.35"
LABELS = {"eager": "eager: reference (eager PyTorch)", "compile": "compile: torch.compile(reference)"}


def colour(contender: str) -> str:
    if is_peer(contender):
        return PEER_COLOURS[peer_index(contender) % len(PEER_COLOURS)]
    return COLOURS[contender]


def _case_label(name, case) -> str:
    vitk = case["contenders"].get("vitk") or {}
    time = f"vitk {fmt_ms(vitk['median_ms'])} ms" if vitk.get("status") == "ok" else "vitk " + skip_text(vitk)
    return f"{name}\n{case['shape']}\n{time}"


def family_figure(data: dict, family: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    by_name = data["families"][family]
    cases = list(by_name.items())
    labels = peer_labels(by_name)
    others = [c for c in family_contenders(by_name) if c != "vitk"]
    bar_h = 0.8 / len(others)
    per_case_in = max(0.75, 0.24 * len(others) + 0.3)
    fig, (ax, roof_ax) = plt.subplots(
        1, 2, sharey=True, figsize=(12, 1.9 + per_case_in * len(cases)), layout="constrained",
        gridspec_kw=dict(width_ratios=(4, 1.2)))

    values = []
    for i, (_, case) in enumerate(cases):
        for j, c in enumerate(others):
            y = i + (j - (len(others) - 1) / 2) * bar_h
            v = case.get("speedups", {}).get(f"{c}/vitk")
            if v:
                values.append(v)
                # Bars grow from 1x, to the right when vitk is faster, to the left when it is slower.
                ax.barh(y, v - 1, left=1, height=0.9 * bar_h, color=colour(c))
                ax.text(v * 1.04 if v >= 1 else v / 1.04, y, fmt_x(v), va="center", ha="left" if v >= 1 else "right",
                        fontsize=7)
            else:
                ax.text(1.04, y, f"{labels.get(c, c).split()[0]}: {skip_text(case['contenders'].get(c))}",
                        va="center", ha="left", fontsize=7, color="0.45")
        frac = (case["contenders"].get("vitk") or {}).get("roofline_fraction")
        if frac:
            roof_ax.barh(i, 100 * frac, height=0.5, color=ROOF_COLOUR)
            roof_ax.text(100 * frac + 2, i, roofline_cell(case), va="center", ha="left", fontsize=7)
    for a in (ax, roof_ax):
        for i in range(1, len(cases), 2):
            a.axhspan(i - 0.5, i + 0.5, color="0.94", zorder=0)

    ax.axvline(1, color="k", lw=1)
    ax.set_xscale("log")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(lo / 2.5, hi * 2.5)               # room for the value labels at the bars' ends
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("speedup of vitk = contender median / vitk median (log scale; > 1x: vitk is faster)")
    ax.set_yticks(range(len(cases)), [_case_label(name, case) for name, case in cases], fontsize=8)
    ax.set_ylim(len(cases) - 0.5, -0.5)           # first case on top
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="0.85", lw=0.6)
    ax.set_axisbelow(True)

    roof_ax.set_xlim(0, 130)                      # past 100% for the labels
    roof_ax.set_xticks([0, 50, 100], ["0", "50%", "100%"])
    roof_ax.set_xlabel("vitk % of roofline")
    roof_ax.tick_params(axis="y", length=0)
    roof_ax.grid(axis="x", color="0.85", lw=0.6)
    roof_ax.set_axisbelow(True)

    handles = [Patch(color=colour(c), label=LABELS.get(c) or f"{c}: {labels[c]}") for c in others]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2), fontsize=8, frameon=False)
    slug = data["machine"]["slug"]
    fig.suptitle(f"{family} on {slug}: speedup of vitk over each contender (contender time / vitk time)",
                 fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)

