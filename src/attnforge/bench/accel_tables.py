"""The Markdown of the accelerator's and quantization's result kinds ("accelerate", "quant-decode",
"quant-quality"): their runs live in `accel/`, their tables here, beside the bench's own kinds, so that
`attnforge bench report` regenerates every committed table from its JSON (bench/performance.py)."""

from __future__ import annotations

from attnforge.bench.report import environment_lines, markdown_table

QUANT_SPEED_TARGETS = {"speed-4bit": 1.8, "quality-8bit": 1.4}  # issue 15: decode tok/s over unquantized


def accel_markdown(doc: dict) -> str:
    """`attnforge bench accel`'s result: a table per scenario, then the targets (GPU) or the agreement
    (CPU)."""
    lines = [f"# attnforge bench accel: {doc['model']} ({doc['weights']} weights, {doc['dtype']})", ""]
    lines += environment_lines({"environment": doc["environment"], "created": doc["created"]})
    lines += [f"- Method: {doc['method']}", ""]
    if doc.get("roofline_tok_s"):
        read, weights = doc["ceilings"]["read_gbps"], doc["weight_bytes"] / 1e9
        lines += [f"Read bandwidth {read:.0f} GB/s; weights {weights:.3f} GB per step: weights-only roofline "
                  f"{doc['roofline_tok_s']:.0f} tok/s.", ""]  # fmt: skip
    if "tokens_match" in doc:
        table = [[r["scenario"], r["row"], r["status"], r.get("first_tokens", "")] for r in doc["rows"]]
        lines += [markdown_table(["scenario", "row", "status", "greedy tokens"], table), ""]
        lines.append(f"Greedy tokens of every row identical: {'yes' if doc['tokens_match'] else 'NO'}")
        return "\n".join(lines) + "\n"
    header = ["row", "tok/s per seq", "total tok/s", "TTFT ms", "GB/s", "% roofline", "attnforge vs it",
              "diverges from transformers at"]  # fmt: skip
    for label in dict.fromkeys(r["scenario"] for r in doc["rows"]):
        table = []
        rows = [r for r in doc["rows"] if r["scenario"] == label]
        ours = next((r for r in rows if r["row"] == "attnforge" and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] != "ok":
                table.append([r["row"], r["status"], "", "", "", "", "", ""])
                continue
            versus = ours["speedup_vs"].get(r["row"]) if ours is not None else None
            table.append([
                r["row"], _num(r.get("decode_tok_s")), _num(r.get("total_tok_s")), _num(r["ttft_ms"]),
                _num(r.get("bandwidth_gb_s")), _num(r.get("pct_of_roofline")),
                f"{versus:.2f}x" if versus else "", _divergences(r),
            ])  # fmt: skip
        lines += [f"## {label}", "", markdown_table(header, table), ""]
    if doc.get("targets"):
        table = [[t["scenario"], t["target"], _num(t["measured"], 2), "met" if t["met"] else "NOT met"]
                 for t in doc["targets"]]  # fmt: skip
        lines += ["## Targets", "", markdown_table(["scenario", "target", "measured", ""], table), ""]
    if doc["skipped"]:
        skipped = "; ".join(f"{s['row']} ({s['scenario']}): {s['reason']}" for s in doc["skipped"])
        lines += ["", f"Skipped: {skipped}"]
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _divergences(row: dict) -> str:
    found = row.get("first_divergence_from", {})
    return ", ".join(f"{k}: {'never' if v is None else v}" for k, v in found.items())


def speed_markdown(doc: dict) -> str:
    """`attnforge bench quant-speed`'s result: one row per recipe, the targets beside them."""
    header = ["recipe", "group", "backend", "tok/s", "x unquantized", "GB/s", "weights GB/step", "target"]
    rows = [[r["recipe"], r["group_size"] or "-", r["backend"] or "-", f"{r['decode_tok_s']:.1f}",
             f"{r['ratio']:.2f}", f"{r['bandwidth_gb_s']:.0f}", f"{r['weight_bytes'] / 1e9:.2f}",
             QUANT_SPEED_TARGETS.get(r["recipe"], "")] for r in doc["rows"]]  # fmt: skip
    env, settings = doc["environment"], doc["settings"]
    device = env.get("gpu") or "CPU only (smoke test: numbers mean nothing)"
    return "\n".join([
        f"# Decode per quantization recipe: {doc['model']} (random weights), batch 1",
        "",
        f"- Device: {device}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
        f"{env.get('transformers')}; commit {env.get('git_commit')}",
        f"- Prompt {settings['prompt_tokens']}, {settings['new_tokens']} new tokens, median of "
        f"{settings['runs']} runs; read bandwidth measured in this run: {doc.get('read_gbps') or '-'} GB/s",
        "",
        markdown_table(header, rows),
        "",
    ])  # fmt: skip


def quality_markdown(doc: dict) -> str:
    """`attnforge bench quant`'s result: one row per recipe."""
    header = [
        "recipe",
        "group",
        "perplexity",
        "logit rel L2",
        "KL nats/token",
        "top-1 agreement",
        "weights MB",
    ]
    rows = [
        [
            r["recipe"],
            r["group_size"] or "-",
            f"{r['perplexity']:.3f}",
            f"{r['rel_l2']:.4f}",
            _kl(r),
            f"{r['top1_agreement'] * 100:.1f}%",
            f"{r['weight_bytes'] / 1e6:.1f}",
        ]
        for r in doc["rows"]
    ]
    lines = [
        f"# Quantization quality: {doc['model']} ({doc['weights']})",
        "",
        f"- Text: {doc['text']}, {doc['tokens']} tokens; dtype {doc['dtype']}",
        *environment_lines(doc),
        "",
        markdown_table(header, rows),
        "",
    ]
    return "\n".join(lines)


def _kl(row: dict) -> str:
    return "-" if row.get("kl") is None else f"{row['kl']:.4f}"
