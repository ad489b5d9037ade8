#!/usr/bin/env python3
"""Summarises the fio runs of Benchmarks/e2e/run (stdlib only: it runs in the VM).

usage: report.py RAW_DIR OUT_DIR

RAW_DIR holds runs.tsv (round, workload, group, config, kind, device, file), the fio
JSON files it names, meta.json and devices.jsonl. Writes OUT_DIR/latest.csv,
latest.json and latest.md, and prints the table.

Per (workload, config): medians over rounds of IOPS, MB/s (10^6 bytes/s), mean and
p99 completion+submission latency (fio's lat_ns, in microseconds), and how busy all
CPUs were during the run (from /proc/stat, in % of all of them: fio, the kernel and
our server together). The ratio of one
of our configs is the median over rounds of ours/kernel IOPS, each round's run
paired with the kernel device of its group (loop: kernel-loop-dio, loop-buffered:
kernel-loop-buffered, null: null_blk) in the same round and workload; min and max of
those ratios are kept too.
"""
import csv
import json
import os
import statistics
import sys

WORKLOAD_ORDER = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32",
                  "seqread-128k-qd16", "seqwrite-128k-qd16", "seqread-128k-buffered", "seqwrite-128k-buffered"]
# The performance issue's targets for our defaults (config "default") against the kernel
# loop driver at its defaults, 4k random I/O.
TARGETS = {"randread-4k-qd32": 1.0, "randwrite-4k-qd32": 1.0, "randread-4k-qd1": 0.85, "randwrite-4k-qd1": 0.85}
TARGET_CONFIG = "ublk-loop-default"


def load_fio(path):
    text = open(path).read()
    data = json.loads(text[text.index("{"):])  # fio may put warnings before the JSON
    job = data["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job error {job['error']}")
    side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    lat = side["lat_ns"]
    return {
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "lat_mean_us": lat["mean"] / 1e3,
        "lat_p99_us": lat.get("percentile", {}).get("99.000000", float("nan")) / 1e3,
    }


def main():
    raw, out = sys.argv[1], sys.argv[2]
    meta = json.load(open(os.path.join(raw, "meta.json")))
    devices = [json.loads(line) for line in open(os.path.join(raw, "devices.jsonl")) if line.strip()]
    elapsed = open(os.path.join(raw, "elapsed_s")).read().strip() if os.path.exists(os.path.join(raw, "elapsed_s")) else ""
    meta["elapsed_s"] = int(elapsed) if elapsed.isdigit() else None
    meta["devices"] = devices

    runs = list(csv.DictReader(open(os.path.join(raw, "runs.tsv")), delimiter="\t"))
    for r in runs:
        r.update(load_fio(os.path.join(raw, r["file"])))
        r["cpu_pct"] = load_cpu(os.path.join(raw, r["file"][:-len(".json")] + ".cpu"))

    # kernel reference per (round, workload, group)
    kernel = {(r["round"], r["workload"], r["group"]): r for r in runs if r["kind"] == "kernel"}
    keys = []
    for r in runs:
        k = (r["workload"], r["config"])
        if k not in keys:
            keys.append(k)
    config_order = [d["config"] for d in devices]
    keys.sort(key=lambda k: (WORKLOAD_ORDER.index(k[0]) if k[0] in WORKLOAD_ORDER else 99,
                             config_order.index(k[1]) if k[1] in config_order else 99))

    rows = []
    for workload, config in keys:
        mine = [r for r in runs if r["workload"] == workload and r["config"] == config]
        kind, group = mine[0]["kind"], mine[0]["group"]
        row = {
            "workload": workload, "group": group, "config": config, "kind": kind, "rounds": len(mine),
            "iops": statistics.median(r["iops"] for r in mine),
            "mb_s": statistics.median(r["mb_s"] for r in mine),
            "lat_mean_us": statistics.median(r["lat_mean_us"] for r in mine),
            "lat_p99_us": statistics.median(r["lat_p99_us"] for r in mine),
            "cpu_pct": median_known(r["cpu_pct"] for r in mine),
            "ratio_iops": None, "ratio_min": None, "ratio_max": None, "kernel_config": None,
            "per_round": [{"round": int(r["round"]), "iops": r["iops"], "mb_s": r["mb_s"],
                           "lat_mean_us": r["lat_mean_us"], "lat_p99_us": r["lat_p99_us"]} for r in mine],
        }
        if kind == "ours":
            ratios = []
            for r in mine:
                k = kernel.get((r["round"], workload, group))
                if k and k["iops"] > 0:
                    ratios.append(r["iops"] / k["iops"])
                    row["kernel_config"] = k["config"]
            if ratios:
                row["ratio_iops"] = statistics.median(ratios)
                row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
                row["ratios"] = ratios
        rows.append(row)

    os.makedirs(out, exist_ok=True)
    fields = ["workload", "group", "config", "kind", "rounds", "iops", "mb_s", "lat_mean_us", "lat_p99_us", "cpu_pct",
              "ratio_iops", "ratio_min", "ratio_max", "kernel_config"]
    with open(os.path.join(out, "latest.csv"), "w", newline="") as f:
        f.write(f"# date={meta['date']} kernel={meta['kernel']} cpu={meta['machine']['cpu_model']!r} "
                f"nproc={meta['machine']['nproc']} host_cpu={meta['host'].get('cpu_model', '')!r} "
                f"host_nproc={meta['host'].get('nproc', '')} vm={meta['host'].get('vm', '')!r} "
                f"rounds={meta['rounds']} runtime_s={meta['runtime_s']} ramp_s={meta['ramp_s']} "
                f"commit={meta.get('commit', '')}\n")
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if k in fields})
    with open(os.path.join(out, "latest.json"), "w") as f:
        json.dump({"meta": meta, "target": {"config": TARGET_CONFIG, "ratios": TARGETS}, "results": rows},
                  f, indent=1)

    table = markdown(rows, meta)
    with open(os.path.join(out, "latest.md"), "w") as f:
        f.write(table)
    print(table)


def load_cpu(path):
    """% of all CPUs busy during a run, from the run's "busy total" jiffies; None if not recorded."""
    try:
        busy, total = (int(x) for x in open(path).read().split())
    except (OSError, ValueError):
        return None
    return 100.0 * busy / total if total > 0 else None


def median_known(values):
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fmt(v, digits=0):
    if v is None:
        return ""
    return f"{v:,.{digits}f}"


def markdown(rows, meta):
    m, h = meta["machine"], meta["host"]
    lines = [
        f"Date {meta['date']}, guest kernel {meta['kernel']}, guest CPU {m['cpu_model']} x {m['nproc']}"
        + (f" ({h['vm']}" if h.get("vm") else "")
        + (f" on host {h['cpu_model']} x {h['nproc']}" if h.get("cpu_model") else "")
        + (")" if h.get("vm") else "")
        + f"; {meta['rounds']} rounds of {meta['runtime_s']} s (+{meta['ramp_s']} s ramp), medians"
        + (f"; commit {meta['commit']}" if meta.get("commit") else "") + ".",
        "",
        "| workload | config | IOPS | MB/s | mean lat (us) | p99 lat (us) | CPU busy (%) | ours/kernel IOPS |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = ""
        if r["ratio_iops"] is not None:
            ratio = f"{r['ratio_iops']:.2f}"
            if r["workload"] in TARGETS and r["config"] == TARGET_CONFIG:
                ratio += " ✅" if r["ratio_iops"] >= TARGETS[r["workload"]] else " ❌"
        lines.append(f"| {r['workload']} | {r['config']} | {fmt(r['iops'])} | {fmt(r['mb_s'], 1)} | "
                     f"{fmt(r['lat_mean_us'], 1)} | {fmt(r['lat_p99_us'], 1)} | {fmt(r['cpu_pct'])} | {ratio} |")
    lines.append("")
    lines.append(f"Ratios: median over rounds of ours/kernel IOPS, each run paired with the kernel device of its group "
                 f"(loop: kernel-loop-dio, loop-buffered: kernel-loop-buffered, null: kernel-null_blk) in the same "
                 f"round; ✅/❌: the targets for our defaults ({TARGET_CONFIG}) against the kernel loop: "
                 + ", ".join(f"{w} >= {t}" for w, t in TARGETS.items()) + ". CPU busy: all vCPUs during "
                 f"the run (100% = every CPU busy), fio, kernel and server together.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
