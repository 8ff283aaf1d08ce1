"""Issue 14 (GPU): the prefill grid through `attnforge tune`'s own machinery (each launch checked against the
float64 oracle on the target's needle case with poisoned padding, then timed interleaved with torch's paths)
with a short list of launches per target: the heuristic's, the one the tuning table stores for the target's
bucket on this GPU, the "ws" tile and each schedule of the Gluon launch (kernels/prefill_gluon.py). Writes a
tuning result (`attnforge tune --from-results <json>` stores its entries).

    python grid_gluon.py <out dir> [--unpadded | --padded]   (GPU; the targets without / with kv_lens, q_lens)
"""

import sys

from attnforge.bench import report, targets, tune
from attnforge.kernels import tuning

_full = tune.candidates_for


def short_candidates(target, device, quick=False) -> list[dict]:
    full = _full(target, device, quick=False)
    stored = tuning.launch_params("prefill", device, target.bucket)
    keep = [full[0]] + ([stored] if stored else []) + [c for c in full if c.get("ws") or c.get("gluon")]
    return tune._unique(keep)


def main() -> None:
    out = sys.argv[1]
    grid = targets.prefill_grid()
    if "--unpadded" in sys.argv or "--padded" in sys.argv:
        grid = [t for t in grid if t.padded == ("--padded" in sys.argv)]
    tune.candidates_for = short_candidates
    part = "-padded" if "--padded" in sys.argv else ""
    stem = report.default_stem("tuning", f"prefill-grid-gluon{part}")  # the device is in the file
    doc = tune.run(grid, checkpoint=lambda doc: tune.save(doc, out, stem))
    tune.save(doc, out, stem)
    print_rows(doc)


def print_rows(doc: dict) -> None:
    for row in doc["rows"]:
        print(
            f"{row['label']}: best {row.get('best')} {row.get('best_us', 0):.0f} us, torch "
            f"{row.get('best_torch')} {row.get('torch_us', 0):.0f} us, x{row.get('speedup', 0):.2f}"
        )


if __name__ == "__main__":
    main()
