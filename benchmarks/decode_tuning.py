"""Write the decode section of kernels/tuning.json from committed GPU results.

    python benchmarks/decode_tuning.py --gpu h100 --sweep results/h100/decode-sweep-DATE.json \
        --grid results/h100/decode-grid-DATE.log   # or the grid's JSON

Per bucket: the sweep's best launch parameters (else null: the kernel's heuristic was measured) and
the speed-up over the fastest correct torch path measured in the grid (else in the sweep, against SDPA
enable_gqa). The optimizer routes a bucket to the kernel only when that speed-up is at least its min_speedup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnforge.kernels.decode import decode_bucket
from attnforge.kernels.tuning import TABLE_PATH


def grid_rows(path: Path) -> list[dict]:
    """(B, Hq, Hkv, Lkv, D, has_kv_lens, speedup) rows from a grid JSON or the log the grid printed."""
    if path.suffix == ".json":
        rows = []
        for r in json.loads(path.read_text())["results"]:
            times = {n: p["median_us"] for n, p in r["providers"].items() if "median_us" in p}
            if "attnforge" not in times or len(times) < 2:
                continue
            best_torch = min(t for n, t in times.items() if n != "attnforge")
            rows.append({**r, "has_kv_lens": "kv_lens" in r, "speedup": best_torch / times["attnforge"]})
        return rows
    rows = []
    for line in path.read_text().splitlines():
        if not line.startswith("["):
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        hq, hkv = (int(x) for x in cells[2].split(":"))
        rows.append({"B": int(cells[1]), "Hq": hq, "Hkv": hkv, "Lkv": int(cells[3]), "D": int(cells[4]),
                     "has_kv_lens": cells[0] != "grid", "speedup": float(cells[10].rstrip("x"))})  # fmt: skip
    return rows


def decode_entries(sweep: dict, rows: list[dict], source: str) -> dict:
    entries = {}
    for s in sweep["sweep"]:
        m = s["medians_us"]
        speedup = m["sdpa_gqa"] / m[s["best"]]
        entries[s["bucket"]] = {"params": s["best_params"], "speedup": round(speedup, 3), "source": source}
    for r in rows:
        bucket = decode_bucket(r["B"], r["Lkv"], r["Hq"] // r["Hkv"], 1, r["D"], r["has_kv_lens"])
        params = entries.get(bucket, {}).get("params")
        entries[bucket] = {"params": params, "speedup": round(r["speedup"], 3), "source": source}
    return entries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", required=True)
    parser.add_argument("--sweep", type=Path, required=True)
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--table", type=Path, default=TABLE_PATH)
    args = parser.parse_args()
    table = json.loads(args.table.read_text()) if args.table.exists() else {}
    source = f"{args.sweep.name} + {args.grid.name}"
    entries = decode_entries(json.loads(args.sweep.read_text()), grid_rows(args.grid), source)
    table.setdefault(args.gpu, {})["decode"] = dict(sorted(entries.items()))
    args.table.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{len(entries)} decode entries for {args.gpu} -> {args.table}")


if __name__ == "__main__":
    main()
