#!/usr/bin/env python3
"""Bar chart of the end-to-end benchmark: ours/kernel IOPS ratio per workload and config.

usage: plot.py [latest.csv [latest.png]]   (defaults: Benchmarks/results/latest.{csv,png})

Reads the CSV Benchmarks/e2e/report.py writes and draws it with gnuplot (Debian's
gnuplot-nox; stdlib Python only): one cluster of bars per workload, one bar per of our
configs (loop configs against the kernel loop with direct I/O, the null target against
null_blk), lines at 1.0 (parity) and 0.85 (the target at 4k random qd32).
"""
import csv
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "latest.csv")
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "results", "latest.png")
    if not shutil.which("gnuplot"):
        sys.exit("plot.py: gnuplot is missing (apt-get install gnuplot-nox)")
    with open(src) as f:
        header = f.readline().lstrip("# ").strip() if f.read(1) == "#" else ""
        f.seek(0)
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    rows = [r for r in rows if r["kind"] == "ours" and r["ratio_iops"]]
    workloads, configs = [], []
    for r in rows:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        if r["config"] not in configs:
            configs.append(r["config"])
    value = {(r["workload"], r["config"]): float(r["ratio_iops"]) for r in rows}
    spread = {(r["workload"], r["config"]): (float(r["ratio_min"] or r["ratio_iops"]), float(r["ratio_max"] or r["ratio_iops"]))
              for r in rows}
    top = max([1.2] + [hi for _, hi in spread.values()]) * 1.1

    meta = dict(part.split("=", 1) for part in shlex.split(header) if "=" in part)
    subtitle = f"{meta.get('date', '')[:10]}, guest kernel {meta.get('kernel', '?')}, {meta.get('vm', '')}" \
               f", {meta.get('rounds', '?')} rounds x {meta.get('runtime_s', '?')} s, median of per-round ratios"

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "ratios.dat")
        with open(data, "w") as f:
            # per config: median, min, max of the per-round ratios
            f.write("workload " + " ".join(f"{c} min max" for c in configs) + "\n")
            for w in workloads:
                cells = []
                for c in configs:
                    if (w, c) in value:
                        cells.append(f"{value[(w, c)]:.4f} {spread[(w, c)][0]:.4f} {spread[(w, c)][1]:.4f}")
                    else:
                        cells.append("- - -")
                f.write(w + " " + " ".join(cells) + "\n")
        n = len(configs)
        step = 1.0 / (n + 1)  # bar spacing of a clustered histogram with gap 1
        script = f"""
set terminal pngcairo size 1400,700 font "sans,11"
set output "{dst}"
set title "ublk-swift / kernel IOPS (each config vs the kernel device of its group: loop, buffered loop, null_blk, dm-crypt on loop, nbd)\\n{subtitle}" noenhanced
set datafile missing "-"
set key autotitle columnheader
set style data histogram
set style histogram errorbars gap 1 lw 1
set errorbars small
set style fill solid 0.85 border -1
set boxwidth 0.9
set key outside right top vertical noenhanced
set xtics noenhanced
set ylabel "ours / kernel IOPS"
set yrange [0:{top:.2f}]
set xrange [-0.5:{len(workloads) - 0.5}]
set grid ytics
set arrow from graph 0, first 1.0 to graph 1, first 1.0 nohead lw 2 lc rgb "#000000" front
set arrow from graph 0, first 0.85 to graph 1, first 0.85 nohead lw 2 dt 2 lc rgb "#d62728" front
set label "1.0" at graph 1.005, first 1.0 left font ",9"
set label "0.85 target" at graph 1.005, first 0.85 left font ",9" tc rgb "#d62728"
set label "bars: median of the per-round ratios; whiskers: min and max over rounds" at graph 0.01, graph 0.97 left font ",9"
plot for [k=0:{n - 1}] "{data}" using (column(2+3*k)):(column(3+3*k)):(column(4+3*k)):xtic(1) title columnheader(2+3*k), \\
     for [k=0:{n - 1}] "{data}" using ($0 + {step:.5f}*(k - {(n - 1) / 2})):(column(4+3*k)):(sprintf("%.2f", column(2+3*k))) \\
         with labels center offset 0,0.7 font ",8" notitle
"""
        script_path = os.path.join(tmp, "plot.gp")
        with open(script_path, "w") as f:
            f.write(script)
        subprocess.run(["gnuplot", script_path], check=True)
    print(f"plot.py: wrote {dst}")


if __name__ == "__main__":
    main()
