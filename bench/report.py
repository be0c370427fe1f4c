"""Turns the JSON in bench/results/ into the README's "Performance" material: one PNG
(bench/performance.png: aggregate tok/s and TTFT against concurrency, Ferry and the peer) and
Markdown tables printed to stdout.

    python -m bench.report
"""

from __future__ import annotations

from bench.common import BENCH_DIR, fmt, load, times

PNG = BENCH_DIR / "performance.png"


def _yes(met) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def plot(conc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for row in conc["rows"]:
        series.setdefault(row["side"], []).append(row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {conc["ferry"]: ("tab:blue", "o"), conc.get("baseline"): ("tab:cyan", "s"),
              conc["peer"]: ("tab:red", "^"), "peer defaults": ("tab:orange", "x")}
    for side, rows in series.items():
        rows = sorted(rows, key=lambda r: r["streams"])
        color, marker = styles.get(side, ("gray", "."))
        xs = [r["streams"] for r in rows]
        left.plot(xs, [r["aggregate_tok_s"] for r in rows], marker=marker, color=color,
                  label=side)
        right.plot(xs, [r["ttft_p50_ms"] for r in rows], marker=marker, color=color,
                   label=f"{side} p50")
        right.plot(xs, [r["ttft_p99_ms"] for r in rows], marker=marker, color=color,
                   linestyle="--", alpha=0.6, label=f"{side} p99")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc["levels"], [str(x) for x in conc["levels"]])
        ax.set_xlabel("concurrent streams")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("aggregate tokens/s")
    left.set_ylim(bottom=0)
    left.set_title("Throughput")
    right.set_yscale("log")
    right.set_ylabel("time to first token (ms)")
    right.set_title("TTFT (solid p50, dashed p99)")
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    m = conc["machine"]
    fig.suptitle(f"SmolLM2-135M Q4_1, {conc['tokens']} tokens/stream, same 2 cores each side "
                 f"- {m['nproc']} x {m['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)
    plt.close(fig)
    print(f"wrote {PNG.relative_to(BENCH_DIR.parent)}")


def summary(over, single, conc, relay) -> list[str]:
    out = ["| benchmark | measured | goal | met |", "|---|---|---|---|"]
    if over:
        out.append(f"| queue overhead (TTFT added vs in-process, {over['runs']} runs) | "
                   f"p50 {over['p50']['added_ms']:+.1f} ms, p99 {over['p99']['added_ms']:+.1f} ms "
                   f"(in-process p50 {fmt(over['p50']['inprocess_ms'])} ms; median of paired "
                   f"differences {over['paired_median_added_ms']:+.1f} ms) | ≤ 10 ms p50, "
                   f"≤ 30 ms p99 | {_yes(over['met'])} |")
    if single:
        med = single["median"]
        out.append(f"| single stream decode ({single['threads']} thread) | Ferry "
                   f"{fmt(med['ferry'])} tok/s vs in-process {fmt(med['inprocess'])} tok/s = "
                   f"{times(med['ratio'])} (median of {single['runs']}; best runs "
                   f"{times(single['best']['ratio'])}) | ≥ 0.95x | {_yes(single['met'])} |")
    if conc and conc.get("goal_at_8"):
        g = conc["goal_at_8"]
        out.append(f"| 8 concurrent streams ({conc['ferry']} vs {conc['peer']}) | aggregate "
                   f"{times(g['aggregate_ratio'])}, TTFT p50 {times(g['ttft_p50_ratio'])}, "
                   f"{g['empty']} failed/empty | ≥ 1.5x, ≤ 0.2x, 0 | {_yes(g['met'])} |")
    if relay:
        at = next((r for r in relay["rows"] if r["streams"] == relay["goal"]["streams"]), None)
        if at:
            out.append(f"| relay, {at['streams']} SSE streams at {relay['rate']:g} tok/s | p99 "
                       f"added {fmt(at['added_p99_ms'])} ms, {at['errors']} errors, "
                       f"{at['incomplete']} incomplete, web RSS {fmt(at['web_rss_total_peak_mb'], 0)} "
                       f"MB | ≤ 50 ms, 0, ≤ 400 MB | {_yes(relay['met'])} |")
    return out


def concurrency_table(conc: dict) -> list[str]:
    by = {(r["side"], r["streams"]): r for r in conc["rows"]}
    out = ["| side | streams | aggregate tok/s | vs peer | TTFT p50 ms | TTFT p99 ms | "
           "TTFT p50 vs peer | failed | empty | cut short | differs |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(conc["rows"], key=lambda r: (r["streams"], r["side"])):
        base = by.get((conc["peer"], r["streams"]))
        agg = times(r["aggregate_tok_s"] / base["aggregate_tok_s"]) if base else "-"
        tt = times(r["ttft_p50_ms"] / base["ttft_p50_ms"]) if base else "-"
        out.append(f"| {r['side']} | {r['streams']} | {fmt(r['aggregate_tok_s'])} | {agg} | "
                   f"{fmt(r['ttft_p50_ms'], 0)} | {fmt(r['ttft_p99_ms'], 0)} | {tt} | "
                   f"{r['failed']} | {r['empty']} | {r['cut']} | {r['differs']} |")
    return out


def relay_table(relay: dict) -> list[str]:
    out = ["| streams | ok | errors | incomplete | gap p50 ms | gap p99 ms | p99 added ms | "
           "web RSS MB | web CPU % | client lag p99 ms |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in relay["rows"]:
        out.append(f"| {r['streams']} | {r['ok']} | {r['errors']} | {r['incomplete']} | "
                   f"{fmt(r['gap_p50_ms'])} | {fmt(r['gap_p99_ms'])} | {fmt(r['added_p99_ms'])} | "
                   f"{fmt(r['web_rss_total_peak_mb'], 0)} | {fmt(100 * r['web_cpu_share'], 0)} | "
                   f"{fmt(r['client_lag_p99_ms'])} |")
    return out


def structured_table(st: dict) -> list[str]:
    free = st["tok_s"]["ferry"]["free"]
    out = ["| workload | Ferry tok/s | TTFT ms | vs free | peer tok/s | peer TTFT ms | vs peer |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, ours in st["tok_s"]["ferry"].items():
        theirs = st["tok_s"]["peer"].get(name)
        out.append(f"| {name} | {fmt(ours)} | {fmt(st['ttft_ms']['ferry'][name], 0)} | "
                   f"{times(ours / free)} | {fmt(theirs)} | "
                   f"{fmt(st['ttft_ms']['peer'].get(name), 0)} | "
                   f"{times(ours / theirs) if theirs else '-'} |")
    out += ["", f"Grammar compile + first mask (nested schema): "
                f"{st['compile_first_mask_ms']:.1f} ms; mask per token "
                f"{st['mask_us_per_token']:.0f} µs. Goals met: {st['met']}."]
    return out


def main(png: bool = True) -> None:
    over, single = load("overhead"), load("single_stream")
    conc, relay, structured = load("concurrency"), load("relay"), load("structured")
    if conc and png:
        plot(conc)
    any_result = next((r for r in (over, single, conc, relay, structured) if r), None)
    if any_result is None:
        print("no results in bench/results/: run `python -m bench` first")
        return
    m = any_result["machine"]
    lines = [f"Measured {any_result['time']} on {m['nproc']} cores ({m['cpu']}), load average "
             f"{m['loadavg'][0]:.1f} at the start.", ""]
    lines += summary(over, single, conc, relay)
    if conc:
        lines += ["", "Concurrency (ratios against " + conc["peer"] + "):", ""]
        lines += concurrency_table(conc)
    if relay:
        lines += ["", f"Relay capacity ({relay['count']} tokens per stream at "
                      f"{relay['rate']:g} tok/s, one web process):", ""]
        lines += relay_table(relay)
    if structured:
        lines += ["", f"Structured output (1 stream, {structured['threads']} thread, greedy; "
                      "peer: llama-cpp-python's server, GBNF):", ""]
        lines += structured_table(structured)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
