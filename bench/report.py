"""The benchmark's outputs: the printed table, CSV (one row per contender and problem), JSON
(the same rows plus the run's settings), a Markdown table for the README and a PNG plot."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

COLUMNS = (
    "device", "case", "shape", "latent", "likelihood", "dtype", "target_dtype", "pass",
    "contender", "backend", "elements", "min_bytes", "reps", "time_ms", "time_ms_p25",
    "time_ms_p75", "time_ms_min", "noise_pct", "preempted_per_step", "page_faults_per_step", "gbps",
    "pct_copy_bw", "peak_extra_mb", "speedup_vs_eager", "speedup_vs_compile", "max_rel_err", "check",
)
# finite and positive in every row of a run whose contenders all ran
NUMERIC = ("time_ms", "gbps", "pct_copy_bw", "peak_extra_mb", "speedup_vs_eager", "speedup_vs_compile")

LEGEND = (
    "ms: median step time; x eager, x compile: vae_fast's speedup (baseline time / vae_fast time, the",
    "median of the per-round ratios of the interleaved rounds);",
    "GB/s: the minimum traffic of docs/design.md / time; % copy BW: vae_fast's GB/s / the measured copy GB/s;",
    "MB: peak extra memory of one step (temporaries, outputs, the .grad it leaves); noise %: largest",
    "interquartile range / median; preempt: involuntary context switches of this process per step",
    "(raised by other processes competing for the cores); faults: minor page faults per step of each",
    "contender (memory the C library took back from the kernel; its cost is in that contender's ms);",
    "check: every contender agrees with eager",
)


def _groups(rows):
    """Rows grouped per problem (case, likelihood, dtype, pass), contenders keyed by name."""
    out = {}
    for r in rows:
        out.setdefault((r["case"], r["likelihood"], r["dtype"], r["pass"]), {})[r["contender"]] = r
    return out


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_lines(rows, contenders, *, markdown=False) -> list[str]:
    """One line per problem: time of each contender, vae_fast's speedups, each contender's
    effective GB/s, vae_fast's % of copy bandwidth, each contender's peak extra memory."""
    head = ["case", "likelihood", "dtype", "pass", "elements"]
    head += [f"{c} ms" for c in contenders]
    baselines = [c for c in ("eager", "compile") if c in contenders and "vae_fast" in contenders]
    head += [f"x {b}" for b in baselines]
    head += [f"{c} GB/s" for c in contenders]
    if "vae_fast" in contenders:
        head += ["% copy BW"]
    head += [f"{c} MB" for c in contenders]
    head += ["reps", "noise %", "preempt"]
    head += [f"{c} faults" for c in contenders]
    head += ["check"]
    body = []
    for (case, lik, dt, ps), by in _groups(rows).items():
        any_row = next(iter(by.values()))
        line = [case, lik, dt, ps, str(any_row["elements"])]
        line += [_fmt(by[c]["time_ms"], ".3f") for c in contenders]
        line += [_fmt(by["vae_fast"][f"speedup_vs_{b}"], ".2f") for b in baselines]
        line += [_fmt(by[c]["gbps"], ".3g") for c in contenders]
        if "vae_fast" in contenders:
            line += [_fmt(by["vae_fast"]["pct_copy_bw"], ".0f")]
        line += [_fmt(by[c]["peak_extra_mb"], ".2f") for c in contenders]
        line += [str(any_row["reps"]), _fmt(any_row["noise_pct"], ".0f"),
                 _fmt(any_row["preempted_per_step"], ".2g")]
        line += [_fmt(by[c].get("page_faults_per_step"), ".0f") for c in contenders]
        line += [any_row["check"]]
        body.append(line)
    return format_table(head, body, left=4, markdown=markdown)  # the first 4 columns are names


def format_table(head, body, *, left: int, markdown=False) -> list[str]:
    """Lines of a table of strings: Markdown, or aligned text with the first `left` columns
    flushed left and the others right."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in body]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else format(v, ".6g")
    return v


def write_csv(path: Path, rows, columns=COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in r.items()})


def _json_value(k, v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if k == "times_ms":
        return [round(t, 4) for t in v]
    return v


def write_json(path: Path, meta: dict, rows):
    clean = [{k: _json_value(k, v) for k, v in r.items()} for r in rows]
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": clean}, f, indent=1)
        f.write("\n")


def write_all(stem: Path, meta: dict, rows, contenders, *, caption: str, title: str) -> list[Path]:
    """`<stem>.csv`, `.json`, `.md` (the table for a README) and `.png`."""
    paths = [stem.with_suffix(ext) for ext in (".csv", ".json", ".md", ".png")]
    write_csv(paths[0], rows)
    write_json(paths[1], meta, rows)
    paths[2].write_text(caption + "\n\n" + "\n".join(table_lines(rows, contenders, markdown=True)) + "\n")
    write_plot(paths[3], rows, title)
    return paths


def write_plot(path: Path, rows, title: str):
    """Speedup of vae_fast over each baseline against problem size: columns fwd | fwd+bwd, one
    row of panels per dtype, one color per baseline, one line style per likelihood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vf = [r for r in rows if r["contender"] == "vae_fast"]
    dtypes = sorted({r["dtype"] for r in vf}, key=lambda d: ("fp32", "bf16").index(d) if d in ("fp32", "bf16") else 9)
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in vf)]
    liks = [lk for lk in ("bernoulli", "bernoulli_bool", "gaussian") if any(r["likelihood"] == lk for r in vf)]
    baselines = [b for b in ("eager", "compile") if any(not math.isnan(r[f"speedup_vs_{b}"]) for r in vf)]
    colors = {"eager": "tab:blue", "compile": "tab:orange"}
    styles = {"bernoulli": ("-", "o"), "bernoulli_bool": ("--", "s"), "gaussian": (":", "^")}
    fig, axes = plt.subplots(len(dtypes), len(passes), figsize=(4.6 * len(passes) + 2.4, 3.4 * len(dtypes) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    for i, dt in enumerate(dtypes):
        for j, ps in enumerate(passes):
            ax = axes[i][j]
            ax.axhline(1.0, color="0.5", lw=0.8)
            for b in baselines:
                for lk in liks:
                    pts = sorted((r["elements"], r[f"speedup_vs_{b}"]) for r in vf
                                 if r["dtype"] == dt and r["pass"] == ps and r["likelihood"] == lk)
                    pts = [p for p in pts if not math.isnan(p[1])]
                    if pts:
                        ls, mk = styles[lk]
                        ax.plot(*zip(*pts), ls=ls, marker=mk, color=colors[b], label=f"vs {b}, {lk}")
            ax.set_xscale("log")
            sizes = sorted({(r["elements"], r["case"]) for r in vf})
            ax.set_xticks([n for n, _ in sizes], [f"{c} {n / 1e6:.2g}M" for n, c in sizes], fontsize=8,
                          rotation=35, ha="right", rotation_mode="anchor")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.set_title(f"{ps}, {dt}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("problem size (elements of recon)")
            if j == 0:
                ax.set_ylabel("vae_fast speedup (higher is better)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
