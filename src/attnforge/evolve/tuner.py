"""`attnforge evolve tune`: an evolutionary search over a kernel's launch parameters, per GPU and bucket.

A genome is one launch configuration (decode: BLOCK_M, BLOCK_N, num_splits, num_warps, num_stages; prefill:
BLOCK_M, BLOCK_N, num_warps, num_stages and, on Hopper, TMA). For each target (one representative call per
tuning bucket: bench/targets.py's Target) the population starts from the heuristic's configuration and
`attnforge tune`'s candidates, then each generation keeps the elite, and fills up with children of
tournament-selected parents (uniform crossover, mutation to neighbouring values). Fitness is the evaluator's
combined_score for a small program that launches attnforge's kernel with those parameters: the full
correctness protocol at the target's shape, then on a GPU the speed-up over the fastest torch path (CUDA
events, cold L2, interleaved); without a GPU 1.0 for a correct configuration (tests plug in their own
fitness). A JSON checkpoint after every generation makes a run resumable; the end writes tuning-store
entries for this GPU (bench/tune.py's `store`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attnforge.bench import report
from attnforge.bench import tune as bench_tune
from attnforge.bench.precompile import HUNG, precompile
from attnforge.bench.targets import Target
from attnforge.evolve.pool import Dispatcher, InlineDispatcher, open_pool
from attnforge.evolve.tasks import Task, TaskShape, seed_for
from attnforge.kernels import tuning

DECODE_GENES = {"BLOCK_M": (16, 32, 64), "BLOCK_N": (16, 32, 64, 128),
                "num_splits": (1, 2, 4, 8, 16, 32, 64, 128), "num_warps": (2, 4, 8),
                "num_stages": (1, 2, 3, 4, 5, 6), "combine": ("last", "kernel-pdl"),
                "tma": (False, True)}  # fmt: skip
PREFILL_GENES = {"BLOCK_M": (32, 64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8),
                 "num_stages": (2, 3, 4), "tma": (False, True), "ws": (False, True), "gluon": (False, True),
                 "pingpong": (False, True), "persistent": (False, True)}  # fmt: skip
# A gene a configuration leaves out takes the kernel's default.
GENE_DEFAULTS = {"combine": "last", "tma": False, "ws": False, "gluon": False, "pingpong": False,
                 "persistent": False}  # fmt: skip
# A tuned configuration replaces the heuristic only if, both re-measured, it was at least this much faster.
MIN_GAIN = 1.02

Fitness = Callable[[Target, dict], dict]  # -> {"score": float, "reason": str, ...}


@dataclasses.dataclass(frozen=True)
class Settings:
    """population: genomes per generation; budget: evaluations per target (the heuristic's included);
    elite: genomes kept unchanged; mutation: chance per gene; seed: makes a run reproducible."""

    population: int = 8
    budget: int = 24
    elite: int = 2
    mutation: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2 or self.budget < 1 or not 0 <= self.elite < self.population:
            raise ValueError(f"population={self.population} must be >= 2, budget={self.budget} >= 1 and "
                             f"elite={self.elite} in [0, population)")  # fmt: skip
        if not 0.0 <= self.mutation <= 1.0:
            raise ValueError(f"mutation={self.mutation} must lie in [0, 1]")


# ----------------------------------------------------------------------------------------------------------
# Genomes


def gene_space(target: Target, device: torch.device) -> dict[str, tuple]:
    """The values each gene may take for `target` (those of the heuristic and of `attnforge tune`'s candidates
    always included)."""
    genes = dict(DECODE_GENES if target.kind == "decode" else PREFILL_GENES)
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if major < 9 or (target.kind == "decode" and not bench_tune.decode_tma_target(target)):
        genes["tma"] = (False,)
    if target.kind == "prefill" and not (major == 9 and bench_tune.warp_spec_target(target)):
        genes["ws"] = (False,)  # the warp-specialized launch: sm_90, and calls that can take it
    if target.kind == "prefill" and not (major == 9 and bench_tune.gluon_target(target)):
        genes["gluon"] = genes["pingpong"] = genes["persistent"] = (False,)  # the Gluon launch likewise
    seeds = [as_genome(seed, genes) for seed in bench_tune.candidates_for(target, device, quick=True)]
    return {name: tuple(sorted(set(values) | {seed[name] for seed in seeds}))
            for name, values in genes.items()}  # fmt: skip


def as_genome(params: dict, genes: dict) -> dict:
    """`params` with every gene: those it leaves out at the kernel's default (GENE_DEFAULTS, else the first
    value)."""
    return {name: params.get(name, GENE_DEFAULTS.get(name, values[0])) for name, values in genes.items()}


def heuristic_genome(target: Target, device: torch.device) -> dict:
    """The configuration the kernel picks without a tuning entry."""
    genes = DECODE_GENES if target.kind == "decode" else PREFILL_GENES
    return as_genome(bench_tune.candidates_for(target, device, quick=True)[0], genes)


def key(genome: dict) -> str:
    return json.dumps(genome, sort_keys=True)


def fits(genome: dict, target: Target) -> bool:
    """Whether the pipelined tiles fit in shared memory (what cannot compile is not worth an evaluation); the
    Gluon launch's schedules all do (their 224 KiB at 3 stages ran: h100/prefill-gluon/)."""
    if genome.get("gluon"):
        return True
    return bench_tune.pipeline_bytes(genome, target) <= tuning.HOPPER_SHARED_MEMORY


def _repair(genome: dict, target: Target, space: dict) -> dict:
    if genome.get("gluon"):  # the Gluon launch: its one tile, a schedule it has (prefill_gluon.SCHEDULES)
        from attnforge.kernels.prefill_gluon import SCHEDULES, schedule

        tile = bench_tune.gluon_candidates()[0]
        genome = {**genome, **{k: tile[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps")}, "tma": False,
                  "ws": False}  # fmt: skip
        if schedule(genome) not in SCHEDULES:  # 3 stages (the persistent schedule runs ping-pong)
            pingpong = bool(genome["pingpong"] or genome.get("persistent"))
            genome = {**genome, "num_stages": 3, "pingpong": pingpong}
        return genome
    for gene in ("pingpong", "persistent"):  # the ping-pong and persistent schedules are the Gluon launch's
        if gene in genome:
            genome = {**genome, gene: False}
    if genome.get("ws"):  # the warp-specialized launch takes the tiles measured right only (one launch)
        from attnforge.kernels.prefill import WS_TILES

        m, n, stages = WS_TILES[0]
        genome = {**genome, "BLOCK_M": m, "BLOCK_N": n, "num_stages": stages, "num_warps": 4, "tma": False}
    while not fits(genome, target) and genome["num_stages"] > min(space["num_stages"]):
        genome = {**genome, "num_stages": genome["num_stages"] - 1}
    return genome


def mutate(genome: dict, space: dict, rate: float, rng: random.Random) -> dict:
    """Each gene, with probability `rate`, moves to a neighbouring value (or, one time in five, any value)."""
    child = dict(genome)
    for name, values in space.items():
        if len(values) < 2 or rng.random() >= rate:
            continue
        index = values.index(child[name])
        if rng.random() < 0.2:
            child[name] = rng.choice(values)
        else:
            child[name] = values[min(len(values) - 1, max(0, index + rng.choice((-1, 1))))]
    return child


def crossover(a: dict, b: dict, rng: random.Random) -> dict:
    """Uniform crossover: each gene from either parent."""
    return {name: (a if rng.random() < 0.5 else b)[name] for name in a}


def _tournament(scored: list[tuple[float, dict]], rng: random.Random, size: int = 2) -> dict:
    return max(rng.sample(scored, min(size, len(scored))), key=lambda pair: pair[0])[1]


# ----------------------------------------------------------------------------------------------------------
# The search for one target


def initial_population(target: Target, device, settings: Settings, space: dict) -> list[dict]:
    """The heuristic's configuration, `attnforge tune`'s candidates, then random genomes, all distinct."""
    rng = random.Random(seed_for(settings.seed, target.label, "initial"))
    seeds = [heuristic_genome(target, device)] + bench_tune.candidates_for(target, device, quick=True)[1:]
    population, seen = [], set()
    for genome in seeds + [
        {n: rng.choice(v) for n, v in space.items()} for _ in range(20 * settings.population)
    ]:
        genome = _repair(as_genome(genome, space), target, space)
        if key(genome) not in seen and fits(genome, target):
            seen.add(key(genome))
            population.append(genome)
        if len(population) == settings.population:
            break
    return population


def next_generation(state: dict, space: dict, settings: Settings, target: Target) -> list[dict]:
    """Elite kept, the rest children of tournament winners; new genomes preferred over evaluated ones."""
    rng = random.Random(seed_for(settings.seed, target.label, "generation", state["generation"]))
    scored = sorted(((state["scores"][key(g)]["score"], g) for g in state["population"]),
                    key=lambda pair: -pair[0])  # fmt: skip
    children = [genome for _, genome in scored[: settings.elite]]
    seen = {key(g) for g in children}
    for _ in range(50 * settings.population):
        if len(children) == settings.population:
            break
        child = mutate(crossover(_tournament(scored, rng), _tournament(scored, rng), rng), space,
                       settings.mutation, rng)  # fmt: skip
        child = _repair(child, target, space)
        novel = key(child) not in state["scores"] or len(seen) >= len(state["scores"])
        if key(child) not in seen and fits(child, target) and novel:
            seen.add(key(child))
            children.append(child)
    return children + [g for _, g in scored[settings.elite :]][: settings.population - len(children)]


def search(target: Target, fitness: Fitness, settings: Settings, *, device: torch.device,
           checkpoint: Path | None = None, progress: Callable[[dict], None] | None = None,
           deadline: float | None = None,
           prepare: Callable[[Target, list[dict]], set[str] | None] | None = None,
           dispatcher: Dispatcher | None = None) -> dict:  # fmt: skip
    """Evolve launch configurations for `target` until `settings.budget` evaluations (or `deadline`, a
    time.monotonic() value) are spent; resumes from `checkpoint` if it exists and saves it every generation.
    `prepare(target, genomes)` runs before each generation's evaluations (e.g. compiles them in parallel) and
    may name genomes (by `key`) whose first launch hung: they score 0 and are never evaluated.
    `dispatcher` (default: `fitness` in this process) evaluates each generation's new genomes, e.g. a
    pool.LocalPool over several GPUs; results are taken in population order, so the search is the same."""
    space = gene_space(target, device)
    state = _load_state(checkpoint, target, settings)
    if state is None:
        state = {"target": dataclasses.asdict(target), "settings": dataclasses.asdict(settings),
                 "generation": 0,
                 "population": initial_population(target, device, settings, space), "scores": {},
                 "history": [], "evaluations": 0, "seconds": 0.0}  # fmt: skip
    while state["evaluations"] < settings.budget and (deadline is None or time.monotonic() < deadline):
        started = time.monotonic()
        if prepare is not None:
            hung = prepare(target, [g for g in state["population"] if key(g) not in state["scores"]]) or set()
            _record_hung(state, hung, settings)
        _evaluate_generation(state, target, settings, dispatcher or InlineDispatcher(fitness), progress)
        state["population"] = [g for g in state["population"] if key(g) in state["scores"]]
        best = max(state["scores"].values(), key=lambda s: s["score"])
        state["history"].append({"generation": state["generation"], "best": best["score"],
                                 "best_params": best["params"],
                                 "evaluations": state["evaluations"]})  # fmt: skip
        state["seconds"] += time.monotonic() - started
        state["generation"] += 1
        state["population"] = next_generation(state, space, settings, target)
        _save_state(checkpoint, state)
    return state


def _record_hung(state: dict, hung: set[str], settings: Settings) -> None:
    """Genomes whose first launch never ended (`prepare`'s answer) score 0 unevaluated, each an evaluation."""
    for genome in state["population"]:
        name = key(genome)
        if name in hung and name not in state["scores"] and state["evaluations"] < settings.budget:
            state["scores"][name] = {"params": genome, "score": 0.0, "timed": False, "reason": HUNG}
            state["evaluations"] += 1


def _evaluate_generation(state: dict, target: Target, settings: Settings, dispatcher: Dispatcher,
                         progress: Callable[[dict], None] | None) -> None:  # fmt: skip
    """Score the population's new genomes (at most the budget left) and record them in population order,
    whatever order the dispatcher finished them in."""
    todo: dict[str, dict] = {}
    for genome in state["population"]:
        if key(genome) not in state["scores"] and len(todo) < settings.budget - state["evaluations"]:
            todo.setdefault(key(genome), genome)
    genomes, done = list(todo.values()), [0]

    def report(index: int, result: dict) -> None:
        done[0] += 1
        if progress is not None:
            progress({"target": target.label, "evaluations": state["evaluations"] + done[0],
                      "genome": genomes[index], **result})  # fmt: skip

    for genome, result in zip(genomes, dispatcher.evaluate(target, genomes, report), strict=True):
        state["scores"][key(genome)] = {"params": genome, **result}
    state["evaluations"] += len(genomes)


def _load_state(path: Path | None, target: Target, settings: Settings) -> dict | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state["target"] != json.loads(json.dumps(dataclasses.asdict(target))):
        raise ValueError(f"checkpoint {path} is for {state['target']}, not {target.label}; remove it or pass "
                         "another --out")  # fmt: skip
    state["settings"] = dataclasses.asdict(settings)  # a resumed run may raise its budget
    return state


def _save_state(path: Path | None, state: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(state, indent=1))
        path.with_suffix(".tmp").replace(path)


# ----------------------------------------------------------------------------------------------------------
# Fitness through the evaluator


PROGRAM = '''"""attnforge's {kind} kernel with fixed launch parameters (written by attnforge evolve tune)."""

import torch

from {module} import {function}

PARAMS = {params!r}


def attention(q, k, v, *, scale=None, causal=True, kv_lens=None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    {call}
    return out
'''


def program_source(kind: str, params: dict) -> str:
    """A candidate program that runs attnforge's kernel of `kind` with launch parameters `params`."""
    if kind == "decode":
        call = "launch_decode(q, k, v, out, scale=scale, kv_lens=kv_lens, params=dict(PARAMS))"
        return PROGRAM.format(kind=kind, module="attnforge.kernels.decode", function="launch_decode",
                              params=params, call=call)  # fmt: skip
    call = "_prefill_into(q, k, v, out, scale, causal, kv_lens, None, None, dict(PARAMS))"
    return PROGRAM.format(kind=kind, module="attnforge.kernels.prefill", function="_prefill_into",
                          params=params, call=call)  # fmt: skip


def target_task(target: Target, *, cuda: bool) -> Task:
    """The evaluator's task for one target: the protocol at the target's shape, timed there."""
    shape = (
        target.batch,
        target.num_heads,
        target.num_kv_heads,
        target.q_len,
        target.kv_len,
        target.head_dim,
    )
    return Task(target.kind, target.dtype, (TaskShape(*shape),), (TaskShape(*shape, target.valid),),
                timing="auto", reps=20 if cuda else 3, timeout_s=300.0,
                memory_gib=None if cuda else 16.0)  # fmt: skip


def evaluator_fitness(target: Target, params: dict) -> dict:
    """The evaluator's verdict on attnforge's kernel with `params` at `target` (a child process)."""
    from attnforge.evolve.evaluator import evaluate

    with tempfile.TemporaryDirectory(prefix="attnforge-tune-") as folder:
        program = Path(folder) / "candidate.py"
        program.write_text(program_source(target.kind, params))
        result = evaluate(program, target_task(target, cuda=torch.cuda.is_available()))
    return {"score": result.score, "reason": result.reason, "timed": bool(result.metrics.get("timed")),
            "speedup_vs_attnforge": result.metrics.get("speedup_vs_attnforge"),
            "seconds": result.metrics.get("seconds")}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# A run over several targets: results, entries


def run(targets: list[Target], settings: Settings, *, fitness: Fitness | None = None,
        out_dir: Path | None = None,
        progress: Callable[[dict], None] | None = None, time_budget_s: float | None = None,
        workers: int = 0, stem: str | None = None, devices: list[str] | None = None) -> dict:  # fmt: skip
    """Search every target; after each generation the checkpoint, and after each target the result document,
    are written under `out_dir` (a run cut short keeps them; run again to resume). `workers` processes compile
    each generation first (GPU only); `devices` (e.g. ["cuda:0", "cuda:1"], pool.parse_devices) spreads each
    generation's evaluations over one pinned worker process per device, with the same result as without."""
    fitness = fitness or evaluator_fitness
    if not devices:
        return _run(targets, settings, fitness, InlineDispatcher(fitness), out_dir, progress, time_budget_s,
                    workers, stem)  # fmt: skip
    with open_pool(fitness, devices) as pool:
        doc = _run(targets, settings, fitness, pool, out_dir, progress, time_budget_s, workers, stem)
    # one worker process (or Ray actor) per device; replaced: workers that died and were started again
    doc["evaluation_workers"] = {"devices": list(pool.devices), "replaced": pool.replaced}
    if out_dir is not None:
        save(doc, out_dir)
    return doc


def _run(targets: list[Target], settings: Settings, fitness: Fitness, dispatcher: Dispatcher,
         out_dir: Path | None, progress: Callable[[dict], None] | None, time_budget_s: float | None,
         workers: int, stem: str | None) -> dict:  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepare = _precompile if (workers > 1 and device.type == "cuda") else None
    started = time.monotonic()
    deadline = None if time_budget_s is None else started + time_budget_s
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = {"what": "evolve-tuning", "created": created, "environment": report.run_environment(),
           "method": _method(device), "settings": dataclasses.asdict(settings),
           "rows": [], "not_run": [t.label for t in targets], "stem": stem}  # fmt: skip
    for target in targets:
        if deadline is not None and time.monotonic() > deadline:
            break
        checkpoint = (
            None if out_dir is None else Path(out_dir) / "checkpoints" / f"{target.kind}-{_slug(target)}.json"
        )
        compile_first = None if prepare is None else (lambda t, g: prepare(t, g, workers))
        state = search(target, fitness, settings, device=device, checkpoint=checkpoint, progress=progress,
                       deadline=deadline, prepare=compile_first, dispatcher=dispatcher)  # fmt: skip
        complete = state["evaluations"] >= settings.budget
        doc["rows"].append(_row(target, state, device, fitness if complete else None))
        _save_state(checkpoint, state)  # with its re-measurement: a resumed run does not repeat it
        doc["not_run"].remove(target.label)
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        doc["evaluations_per_minute"] = _rate(doc["rows"])
        if out_dir is not None:
            save(doc, out_dir)
    return doc


def _rate(rows: list[dict]) -> float | None:
    """Evaluations per minute of search (re-measurements and worker start-up not counted)."""
    seconds = sum(row["search_s"] for row in rows)
    return round(60.0 * sum(row["evaluations"] for row in rows) / seconds, 2) if seconds > 0 else None


def _precompile(target: Target, genomes: list[dict], workers: int) -> set[str]:
    """Compile a generation's configurations in parallel worker processes (bench/precompile.py), so the
    evaluator's processes find them in Triton's cache; returns the keys of those whose first launch hung."""
    if not genomes:
        return set()
    plan = [(target, [genome]) for genome in genomes]
    _, hung = precompile(plan, min(workers, len(genomes)), key)
    return {name for _, name in hung}


def _slug(target: Target) -> str:
    return target.bucket + ("" if target.valid is None else "-valid") + f"-{target.dtype}"


def _row(target: Target, state: dict, device: torch.device, fitness: Fitness | None) -> dict:
    """The target's outcome; the best configuration and the heuristic's re-measured side by side when the
    search timed them and they differ (the search's maximum is biased upwards by noise). Without `fitness`
    (the search was cut short) no entry."""
    space = gene_space(target, device)
    heuristic = _repair(heuristic_genome(target, device), target, space)
    scores = state["scores"]
    best = max(scores.values(), key=lambda s: s["score"])
    base = scores.get(key(heuristic), {})
    row = {"target": dataclasses.asdict(target), "label": target.label, "bucket": target.bucket,
           "evaluations": state["evaluations"], "generations": state["generation"],
           "search_s": round(state["seconds"], 1), "history": state["history"],
           "heuristic_params": heuristic, "heuristic_score": base.get("score"),
           "best_params": best["params"], "best_score": best["score"], "best_reason": best.get("reason", ""),
           "timed": bool(best.get("timed")), "complete": fitness is not None}  # fmt: skip
    if not row["timed"] or fitness is None:
        return row
    params, speedup = None, base.get("score")
    if best["params"] != heuristic:
        if state.get("remeasured", {}).get("params") != best["params"]:
            state["remeasured"] = {"params": best["params"], "best": fitness(target, best["params"])["score"],
                                   "heuristic": fitness(target, heuristic)["score"]}  # fmt: skip
        again = row["remeasured"] = state["remeasured"]
        speedup = again["heuristic"]
        if again["best"] >= MIN_GAIN * again["heuristic"]:
            params, speedup = best["params"], again["best"]
    name = bench_tune.params_name(params or heuristic)
    row.update(best=name, speedup=speedup, changes_heuristic=params is not None,
               candidates={name: {"params": params}})  # fmt: skip
    return row


def _method(device: torch.device) -> str:
    fitness = (
        "the evaluator's combined_score: the full correctness protocol at the target's shape, then the "
        "speed-up over the fastest torch path (CUDA events, 256 MiB L2 flush, 20 samples interleaved with "
        "attnforge's kernel and torch, a new query every timed call, timed outputs checked afterwards)"
        if device.type == "cuda"
        else "correctness only (no CUDA GPU): 1.0 for a configuration that passes the protocol, else 0"
    )
    return (
        "evolutionary search per target: population seeded with the heuristic's configuration and attnforge "
        "tune's candidates; tournament selection, uniform crossover, mutation to neighbouring values, "
        "elitism; "
        f"each candidate in its own process. Fitness: {fitness}. A configuration other than the heuristic's "
        f"becomes the entry only if, re-measured beside it, it is at least {MIN_GAIN:.2f}x as fast."
    )


def entries_source(doc: dict) -> str:
    return f"attnforge evolve tune ({doc['created'][:10]})"


def store(doc: dict, table: Path | None = None) -> str | None:
    """Write the timed rows' entries into the tuning store (default: the user's table) for this GPU."""
    timed = [row for row in doc["rows"] if row.get("speedup") is not None]
    if not timed:
        return None
    return bench_tune.store({**doc, "rows": timed}, entries_source(doc), table)


def markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        f"# attnforge evolve tune on {env.get('gpu', env.get('device'))} — {doc['created'][:10]}", "",
        f"torch {env.get('torch')}, triton {env.get('triton')}; commit {env.get('git_commit')}; "
        f"settings {doc['settings']}; whole run {doc.get('elapsed_s', 0):.0f} s; "
        f"{doc.get('evaluations_per_minute')} evaluations per minute of search on "
        f"{', '.join(doc.get('evaluation_workers', {}).get('devices', [])) or 'this process'}.", "",
        f"Method: {doc['method']}", "",
        "| target | bucket | heuristic | its score | best found | its score | re-measured best / heuristic "
        "| entry | evaluations | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in doc["rows"]:
        again = row.get("remeasured")
        remeasured = f"{again['best']:.3f} / {again['heuristic']:.3f}" if again else "-"
        entry = (
            "-"
            if row.get("speedup") is None
            else (
                f"{row['best']} ({row['speedup']:.3f}x)"
                + (" tuned" if row["changes_heuristic"] else " heuristic")
            )
        )
        base = "-" if row["heuristic_score"] is None else f"{row['heuristic_score']:.3f}"
        lines.append(
            f"| {row['label']} | {row['bucket']} | {bench_tune.params_name(row['heuristic_params'])} | "
            f"{base} | {bench_tune.params_name(row['best_params'])} | {row['best_score']:.3f} | "
            f"{remeasured} | {entry} | {row['evaluations']} | {row['search_s']:.0f} |"
        )  # fmt: skip
    if doc["not_run"]:
        lines += ["", f"Not run (time budget): {', '.join(doc['not_run'])}"]
    return "\n".join(lines) + "\n"


def save(doc: dict, out_dir: Path, stem: str | None = None) -> list[Path]:
    """`<stem>.json` (every evaluation's verdict) and `<stem>.md` under out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or doc.get("stem") or report.default_stem("evolve-tuning")
    doc["stem"] = stem
    (out / f"{stem}.md").write_text(markdown(doc))
    return [report.write_json(doc, out / f"{stem}.json"), out / f"{stem}.md"]


def shape_target(kind: str, text: str, dtype: str = "bfloat16") -> Target:
    """A target from `BxHqxHkvxLqxLkvxD[@valid]`, e.g. `1x32x8x1x32768x128@4096` (valid keys per sequence)."""
    sizes, _, valid = text.partition("@")
    try:
        numbers = [int(n) for n in sizes.lower().split("x")]
        lens = None if not valid else (int(valid),) * numbers[0]
    except ValueError:
        numbers = []
    if len(numbers) != 6 or min(numbers) < 1:
        raise ValueError(f"shape {text!r} is not BxHqxHkvxLqxLkvxD[@valid] with positive sizes, "
                         "e.g. 1x32x8x1x4096x128 or 1x32x8x1x32768x128@4096")  # fmt: skip
    target = Target(kind, *numbers, dtype, lens)
    TaskShape(*numbers[:6], lens)  # the same checks as the evaluator's
    return target


__all__ = ["Settings", "evaluator_fitness", "gene_space", "run", "search", "shape_target", "store"]
