"""results.md and its plots, written from results.json's content (nothing is re-measured)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["targets", "write_report"]


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this run's figures (``met`` is ``None`` when not measured)."""
    dp = _get(r, "dp_overhead", "models") or {}
    acc = _get(r, "accuracy_vs_epsilon") or {}
    sim = _get(r, "simulation", "sizes") or {}
    mem = _get(r, "memory_growth") or {}
    acc_ds = acc.get("dataset", "?")
    iid = _get(acc, "federated", "iid", "3.0", "accuracy")
    dirichlet = _get(acc, "federated", "dirichlet", "3.0", "accuracy")
    gap = None if iid is None or dirichlet is None else round(100 * (iid - dirichlet), 2)
    largest = max(sim, key=int) if sim else None
    size100 = "100" if "100" in sim or largest is None else largest  # the target's size

    def row(name: str, value: Any, target: str, ok: Callable[[float], bool], anchor: str = "",
            unit: str = "") -> dict[str, Any]:
        met = None if value is None else bool(ok(value))
        return {"name": name, "value": value, "unit": unit, "target": target, "anchor": anchor,
                "met": met}

    return [
        row("DP-SGD time ÷ non-private, cnn, ExpandedWeights (what auto picks)",
            _get(dp, "cnn", "ew", "time_ratio"), "≤ 1.5×", lambda v: v <= 1.5,
            "Opacus MNIST example on CPU: 1.58×", "×"),
        row("DP-SGD time ÷ non-private, cnn, hooks", _get(dp, "cnn", "hooks", "time_ratio"),
            "≤ 1.5×", lambda v: v <= 1.5, "Opacus MNIST example on CPU: 1.58×", "×"),
        row("DP-SGD time ÷ non-private, cnn, ghost", _get(dp, "cnn", "ghost", "time_ratio"),
            "≤ 1.5×", lambda v: v <= 1.5, "Opacus MNIST example on CPU: 1.58×", "×"),
        row("DP-SGD peak memory ÷ non-private, mlp-wide (linear-heavy), ghost",
            _get(dp, "mlp-wide", "ghost", "peak_memory_ratio"), "≤ 1.1×",
            lambda v: v <= 1.1, "Opacus ghost clipping ≈ 1×", "×"),
        row(f"accuracy at ε = 3, {acc.get('num_clients', '?')} clients IID ({acc_ds})", iid,
            "≥ 0.86 (aim 0.897)",
            lambda v: v >= 0.86, "Tramèr & Boneh: 0.860 end-to-end CNN, 0.897 ScatterNet "
            "(Fashion-MNIST, central)"),
        row(f"IID − Dirichlet(0.5) at ε = 3 ({acc_ds}), points", gap, "≤ 3", lambda v: v <= 3),
        row(f"speedup_vs_naive at {size100} clients", _get(sim, size100, "speedup_vs_naive"),
            "≥ 5×", lambda v: v >= 5, "pfl-research: 7–72× over other simulators", "×"),
        row(f"speedup_vs_naive at {size100} clients, worker cache off (fedpriv before the "
            "cache)",
            _get(sim, size100, "speedup_vs_naive_without_cache"), "≥ 5×", lambda v: v >= 5, "",
            "×"),
        row("peak RSS per simulated client worker (MB)",
            _get(r, "simulation", "fedpriv_peak_rss_per_worker_mb"), "≤ 300",
            lambda v: v <= 300, "≈ 540 MB seen for the naive pattern"),
        row(f"memory_growth, round {mem.get('late', '?')} ÷ round {mem.get('early', '?')}",
            mem.get("ratio"), "≤ 1.1×", lambda v: v <= 1.1, "", "×"),
    ]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows)]


def _plot(path: Path, draw: Callable[[Any], None]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    try:
        draw(ax)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path.name


def _dp_section(r: dict[str, Any], out: Path) -> list[str]:
    dp = r.get("dp_overhead") or {}
    if "models" not in dp:
        return [f"Not run or failed: {_fmt(dp.get('error', 'not run'))[:400]}"]
    lines = [f"{dp['method']}. Data `{dp['dataset']}` ({dp['examples']} examples; memory: "
             f"{dp['memory_examples']}), batch {dp['batch_size']}, {dp['threads']} thread(s), "
             f"median of {dp['repeats']} repeat(s).", ""]
    rows = []
    for model, v in dp["models"].items():
        for mode in ("hooks", "ghost", "ew"):
            m = v.get(mode)
            if m is None:
                continue
            if "error" in m:
                rows.append([model, v["parameters"], mode, "error: " + m["error"][:80], "", "",
                             "", "", ""])
                continue
            rows.append([model, v["parameters"], mode, m["time_ratio"], m["cpu_time_ratio"],
                         m["peak_memory_ratio"], m["training_rss_ratio"],
                         m["peak_rss_ratio_process"],
                         f"{v['nonprivate']['median_epoch_s']:.3f} → {m['median_epoch_s']:.3f}"])
    lines += _table(["model", "weights", "mode", "time ÷ plain", "CPU time ÷ plain",
                     "peak tensor memory ÷ plain", "training RSS ÷ plain",
                     "process peak RSS ÷ plain", "s/epoch plain → DP"], rows)

    def draw(ax: Any) -> None:
        labels = [f"{row[0]}\n{row[2]}" for row in rows if isinstance(row[3], float)]
        vals = [row[3] for row in rows if isinstance(row[3], float)]
        ax.bar(labels, vals, color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("DP-SGD time ÷ non-private")
        ax.tick_params(axis="x", labelsize=7)

    name = _plot(out / "dp_overhead.png", draw)
    return lines + (["", f"![DP overhead]({name})"] if name else [])


def _sim_section(r: dict[str, Any], out: Path) -> list[str]:
    sim = r.get("simulation") or {}
    if "sizes" not in sim:
        return [f"Not run or failed: {_fmt(sim.get('error', 'not run'))[:400]}"]
    lines = [sim.get("method", ""), ""]
    rows = []
    for size, v in sim["sizes"].items():
        for kind in ("naive", "fedpriv", "fedpriv_without_cache"):
            k = v.get(kind)
            if k is None:
                continue
            suffix = "_without_cache" if kind == "fedpriv_without_cache" else ""
            rows.append([size, v.get("sampled"), kind, k.get("updates_per_s"),
                         k.get("round_s"), k.get("cpu_s_per_update"), k.get("wall_s"),
                         k.get("peak_rss_per_worker_mb"), k.get("peak_private_per_worker_mb"),
                         k.get("peak_rss_total_mb"), v.get("speedup_vs_naive" + suffix),
                         v.get("speedup_vs_naive_cpu" + suffix)])
    lines += _table(["clients", "sampled/round", "path", "updates/s", "round s (median)",
                     "CPU s/update", "wall s (all)", "peak RSS/worker MB",
                     "private MB/worker", "peak RSS total MB", "speedup_vs_naive",
                     "by CPU s/update"], rows)

    def draw(ax: Any) -> None:
        sizes = [int(s) for s in sim["sizes"]]
        for kind, style in (("fedpriv", "o-"), ("naive", "s--"),
                            ("fedpriv_without_cache", "^:")):
            xs = [s for s in sizes if _get(sim, "sizes", str(s), kind, "updates_per_s")]
            if xs:
                ax.plot(xs, [_get(sim, "sizes", str(s), kind, "updates_per_s") for s in xs],
                        style, label=kind)
        ax.set_xscale("log")
        ax.set_xlabel("simulated clients")
        ax.set_ylabel("client updates / s")
        ax.legend()

    name = _plot(out / "simulation.png", draw)
    return lines + (["", f"![throughput]({name})"] if name else [])


def _memory_section(r: dict[str, Any], out: Path) -> list[str]:
    mem = r.get("memory_growth") or {}
    if "ratio" not in mem:
        return [f"Not run or failed: {_fmt(mem.get('error', 'not run'))[:400]}"]
    lines = [mem.get("method", ""), ""]
    lines += _table(["processes", f"RSS at round {mem['early']} (MB)",
                     f"RSS at round {mem['late']} (MB)", "ratio"],
                    [[k, v["early_mb"], v["late_mb"], v["ratio"]]
                     for k, v in mem["by_group"].items()])

    def draw(ax: Any) -> None:
        curve = mem.get("curve_mb", {})
        for group, points in curve.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=group)
        ax.set_xlabel("round")
        ax.set_ylabel("RSS (MB)")
        ax.legend(fontsize=7)

    name = _plot(out / "memory_growth.png", draw)
    return lines + (["", f"![memory]({name})"] if name else [])


def _accuracy_section(r: dict[str, Any], out: Path) -> list[str]:
    acc = r.get("accuracy_vs_epsilon") or {}
    if "central" not in acc:
        return [f"Not run or failed: {_fmt(acc.get('error', 'not run'))[:400]}"]
    lines = [acc.get("method", ""), ""]
    rows = [["non-private (central)", "∞", acc["nonprivate"]["accuracy"], ""]]
    for eps, v in acc["central"].items():
        rows.append(["DP-SGD central (one client, pooled data)", eps, v["accuracy"],
                     v.get("epsilon")])
    for part, by_eps in acc["federated"].items():
        for eps, v in by_eps.items():
            rows.append([f"fedpriv, {acc['num_clients']} clients, {part}", eps,
                         v.get("accuracy"), v.get("epsilon")])
    lines += _table(["setting", "target ε", "accuracy", "ε reached"], rows)

    def draw(ax: Any) -> None:
        eps = [float(e) for e in acc["central"]]
        ax.plot(eps, [acc["central"][e]["accuracy"] for e in acc["central"]], "o-",
                label="central DP-SGD")
        for part, by_eps in acc["federated"].items():
            xs = [float(e) for e in by_eps if by_eps[e].get("accuracy") is not None]
            ax.plot(xs, [by_eps[e]["accuracy"] for e in by_eps
                         if by_eps[e].get("accuracy") is not None], "s--", label=f"fedpriv {part}")
        ax.axhline(acc["nonprivate"]["accuracy"], color="grey", ls=":", label="non-private")
        ax.set_xlabel(f"ε (δ = {acc.get('delta', 1e-5):g})")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)

    name = _plot(out / "accuracy_vs_epsilon.png", draw)
    return lines + (["", f"![accuracy]({name})"] if name else [])


def _profile_section(r: dict[str, Any]) -> list[str]:
    prof = r.get("profile") or {}
    if "phases" not in prof:
        return [f"Not run or failed: {_fmt(prof.get('error', 'not run'))[:400]}"]
    lines = [prof.get("method", ""), ""]
    lines += _table(["phase", "CPU s per call", "share"],
                    [[p["phase"], f"{p['cpu_s']:.3f}", f"{100 * p['share']:.0f} %"]
                     for p in prof["phases"]])
    whatif = prof.get("what_if") or []
    if whatif:
        lines += ["", "The same calls in another setting (fedpriv before the worker cache):",
                  ""]
        lines += _table(["setting", "CPU s per call", "÷ as is"],
                        [[w["variant"], f"{w['cpu_s']:.3f}", w["speedup"]] for w in whatif])
    lines += ["", f"As is: {prof.get('cpu_s_per_call', 0):.3f} CPU s per call."]
    return lines


def write_report(r: dict[str, Any], out: Path) -> None:
    """Write ``out/results.md`` (and its PNG plots) from the results dictionary."""
    m = r.get("machine", {})
    v = m.get("versions", {})
    lines = [
        f"# fedpriv benchmarks: `{r.get('suite')}` suite", "",
        f"{r.get('description', '')}. Started {r.get('started')}, {r.get('wall_s')} s in all, "
        f"{r.get('cpu_s')} CPU seconds (this process and its children).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
        f"load average at start {_fmt(m.get('load_average'))}, at end "
        f"{_fmt(r.get('load_average_end'))} (other work shares this machine: every ratio "
        "below is between runs of the same script, close in time). Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
        "## Targets", "",
    ]
    t = targets(r)
    lines += _table(["figure", "this run", "target", "met", "anchor"],
                    [[row["name"], row["value"], row["target"],
                      {True: "yes", False: "no", None: "—"}[row["met"]], row["anchor"]]
                     for row in t])
    lines += ["", "## DP cost (`dp_overhead`)", "", *_dp_section(r, out)]
    lines += ["", "## Where a client's time goes (`profile`)", "", *_profile_section(r)]
    lines += ["", "## Simulation throughput (`simulation`)", "", *_sim_section(r, out)]
    lines += ["", "## Memory growth (`memory_growth`)", "", *_memory_section(r, out)]
    lines += ["", "## Accuracy against ε (`accuracy_vs_epsilon`)", "",
              *_accuracy_section(r, out)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
