"""``make gpu-train``: the default model's gates trained at full throughput on the GPU in a fixed wall-time budget,
evaluated on the README grid in batches, everything in one folder.

Steps, one process, each timed and reported in the summary table (a failed step is named, the later ones that need
it are skipped):

1. ``assemble``: the default model's GGUF from the parts the visit's commands carried (sha256 checked,
   :mod:`bench.gpu_stage`);
2. ``size``: rows per step from the GPU's memory (two probe steps of the recipe's model and gates,
   :func:`trimkv.train.throughput.rows_for_memory`), then the step time at that batch, which sets the steps that fit
   ``--train-seconds`` (the cosine schedule then ends when the budget does);
3. ``train``: :func:`trimkv.train.run.finetune` on ``recipes/smollm2-135m-qa-4k-m128-gpu.yaml`` with that batch
   and those steps (and a hard ``time_limit`` a little above the budget); tokens/s from its metrics;
4. ``eval``: :func:`trimkv.eval.batched.run_eval_batched` on the README grid (passkey 2k / 4k / 8k, M = 32 / 64 /
   128, n = 40, the full cache, the new gates and every baseline), fp32 like the CPU cells so the two add up, in
   priority order until ``--eval-seconds`` are spent (the cells left are listed); then the default 2k gates (what
   ships, and the warm start) on the same prompts, for the "better than the CPU-trained ones" question;
5. the folder (gates, ``train/metrics.jsonl``, ``eval/`` with ``results.md``, ``summary.txt``) bundled into
   ``--out`` (``$OUT`` on the device), without training checkpoints.

``--dry-run``: the same steps on this CPU with a tiny random model and tokenizer, a few steps and a few prompts (the
recipe file is still parsed and validated, and the staged parts, when present, are joined and checked).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from trimkv.shipped import default_gates

try:
    from . import common, gpu_parts, gpu_stage
except ImportError:  # python bench/gpu_train.py
    import common
    import gpu_parts
    import gpu_stage

REPO = gpu_parts.REPO
RECIPE = REPO / "recipes" / "smollm2-135m-qa-4k-m128-gpu.yaml"
DEFAULT = default_gates()                # what ships, and the recipe's warm start
TRAIN_S, EVAL_S = 140.0, 120.0
BASELINES = ["streaming", "snapkv", "h2o", "tova", "knorm", "keydiff"]
# The README grid, most wanted first: (name, lengths, policies, gates). ``None`` gates: the ones trained here.
GRID = [
    ("gates 4k", [4096], ["full", "trimkv"], None),
    ("gates 2k", [2048], ["full", "trimkv"], None),
    ("gates 8k", [8192], ["full", "trimkv"], None),
    ("default 2k/4k", [2048, 4096], ["trimkv"], DEFAULT),
    ("baselines", [2048, 4096, 8192], BASELINES, None),
    ("per prompt", [2048, 4096, 8192], ["oracle", "random"], None),
]
# Seconds a group is expected to take on the H200 (guesses: ~1 s per batched cell and 1k tokens of prompt / 8k, 0.6 s
# a prompt one at a time): a group starts only if its estimate fits what is left of the budget.
GROUP_ESTIMATE = {"gates 4k": 10, "gates 2k": 6, "gates 8k": 15, "default 2k/4k": 10, "baselines": 60,
                  "per prompt": 300}
# What an earlier run left in the folder that a rerun deletes first (it keeps data-cache/ and the dry run's
# tiny-model/, which are caches).
EARLIER = ("train", "gates", "eval", "eval-default", "data-*.log", "summary.json", "summary.txt", "train.tar.gz*")
# Rough seconds of the steps around training and eval on the H200 (model conversion, data, imports, bundling).
OVERHEAD_S = {"assemble": 5, "size": 40, "data (beyond the sizing)": 20, "load": 20, "bundle": 10}


class Steps:
    """Runs named steps, times them, records failures; a step whose inputs failed is skipped."""

    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn, *needs: str):
        failed = [r["part"] for r in self.rows if not r["ok"] and r["part"] in needs]
        if failed:
            self.rows.append({"part": name, "ok": False, "seconds": 0.0, "result": f"skipped: {failed} failed"})
            return None
        t0 = time.perf_counter()
        try:
            value, result = fn()
            ok = True
        except Exception as err:  # noqa: BLE001 - every step reports, the summary is written whatever happens
            traceback.print_exc()
            value, result, ok = None, f"{type(err).__name__}: {str(err)[:300]}", False
        self.rows.append({"part": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 1), "result": result})
        print(gpu_parts.table(self.rows[-1:], header=len(self.rows) == 1), flush=True)
        return value


# ------------------------------------------------------------------------------------------------------ steps


def assemble(dry: bool, work: Path) -> tuple[Path | None, str]:
    """The GGUF from the staged parts. Dry run: join the local parts into a temporary file and check it."""
    if not dry:
        path = gpu_stage.assemble(gpu_stage.read_manifest())
        return path, f"{path.name} assembled, sha256 checked"
    if not gpu_stage.MANIFEST.is_file():
        return None, "nothing staged here yet (make gpu-stage); the dry run trains a tiny model instead"
    manifest = gpu_stage.read_manifest()
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "parts").mkdir()
        for part in manifest["parts"]:
            os.symlink(gpu_stage.PARTS_DIR / part["name"], stage / "parts" / part["name"])
        path = gpu_stage.assemble(manifest, stage=stage, dest=stage / manifest["gguf"])
        return None, f"{len(manifest['parts'])} staged parts join into {path.name} (sha256 checked)"


def recipe_sets(args, work: Path) -> list[str]:
    """The overrides of the GPU recipe for this run: its folders, and for a dry run a tiny model, tiny data and
    a few steps (the recipe file itself is validated either way)."""
    sets = [f"output.run_dir={work / 'train'}", f"output.checkpoint={work / 'gates'}", "logging.wandb=disabled",
            f"data.cache_dir={work / 'data-cache'}"]
    if args.dry_run:
        tiny = common.random_model_dir(work / "tiny-model", "tiny")
        sets += [f"model.name={tiny}", "model.dtype=float32", "gates.init_from=null", "gates.gate_hidden=16",
                 "data.mixture=null", "data.source=builtin:prose", "data.seq_len=64", "data.pack=true",
                 "train.device=cpu", "loss.budget=16", "loss.chunk_size=64"]
    return sets


def start_data(recipe, sets: list[str], args, work: Path) -> tuple[list, str]:
    """Convert the model once (its tokenizer keys the data cache), then build every data source in its own process
    while the GPU is sized: building the QA documents is CPU work of about a minute."""
    from trimkv.base_model import load_model

    load_model(recipe.model.name, dtype="float32", device="cpu")              # the one-time GGUF conversion
    n = len(recipe.data.components())
    procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu_train", "--prepare", str(k), "--work", str(work),
                               *(["--dry-run"] if args.dry_run else [])], cwd=REPO,
                              stdout=open(work / f"data-{k}.log", "w"), stderr=subprocess.STDOUT)
             for k in range(n)]
    return procs, f"{n} data sources building in {n} processes"


def finish_data(procs, recipe, t0: float) -> tuple[int, str]:
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"building the data failed (exit codes {codes}): see data-*.log")
    from trimkv.base_model import load_model
    from trimkv.data import prepare_data

    _, tok = load_model(recipe.model.name, dtype="float32", device="cpu")
    rows = prepare_data(recipe.data, tok)                                        # cached now: reads only
    return rows, f"{rows} rows of {recipe.data.seq_len} tokens, {time.perf_counter() - t0:.0f} s from the start"


def prepare_component(k: int, args, work: Path) -> int:
    """``--prepare K``: build (and cache) data source K of the recipe."""
    from trimkv.base_model import load_model
    from trimkv.data import build_dataset
    from trimkv.recipe import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(RECIPE, recipe_sets(args, work))
    _, tok = load_model(recipe.model.name, dtype="float32", device="cpu")
    cfg = recipe.data.components()[k][0]
    rows = build_dataset(cfg, tok)
    print(f"{cfg.source}: {len(rows)} rows")
    return 0


def size(recipe, args) -> tuple[dict, str]:
    """Rows per step that fit the GPU, the step time there, and the steps that fill the training budget."""
    from bench.train_step import make_batch, peak_of
    from trimkv.attach import attach_gates
    from trimkv.base_model import load_model
    from trimkv.train.engines import PlainEngine
    from trimkv.train.run import initial_gates
    from trimkv.train.throughput import first_that_fits, rows_for_memory

    m, T = recipe.model, recipe.data.seq_len
    model, _ = load_model(m.name, dtype=m.dtype, device="cuda" if not args.dry_run else "cpu")
    for prm in model.parameters():
        prm.requires_grad_(False)
    handle = attach_gates(model, initial_gates(model, recipe), attn_impl=recipe.train.attn_impl)
    engine = PlainEngine(model, handle, recipe)

    def step(rows: int) -> None:
        engine.forward_backward(make_batch(rows, T, model.config.vocab_size, scored=1.0), last=True)
        engine.optimizer_step()

    if args.dry_run:
        rows = 2
    else:                               # not yet run on a GPU (issue 24): the dry run takes the branch above
        limit = args.memory_fraction * torch.cuda.get_device_properties(0).total_memory
        rows = rows_for_memory(lambda b: peak_of(lambda: step(b), "cuda"), limit_bytes=limit, most=args.max_rows)
        rows = first_that_fits(step, rows)
    seconds = common.timeit(lambda: step(rows), repeat=3, warmup=1, device="cpu" if args.dry_run else "cuda")
    steps = max(3, int(args.train_seconds / seconds))
    handle.detach()
    del model, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ({"rows": rows, "step_s": seconds, "steps": steps},
            f"{rows} rows x {T} tokens a step, {seconds:.2f} s a step (all positions scored) -> {steps} steps")


def train(recipe, base_sets: list[str], sized: dict, args, work: Path) -> tuple[dict, str]:
    from trimkv.recipe import load_recipe
    from trimkv.train.run import finetune

    steps = sized["steps"]
    sets = [f"data.batch_size={sized['rows']}", f"train.steps={steps}", f"train.save_every={steps}",
            f"train.warmup_steps={min(recipe.train.warmup_steps, max(1, steps // 10))}"]
    final = load_recipe(RECIPE, base_sets + sets)
    t0 = time.perf_counter()
    gates = finetune(final, progress=False, time_limit=args.train_seconds * 1.25)
    seconds = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    tok_s = statistics.median(m["tokens_per_s"] for m in metrics[len(metrics) // 4:])
    info = {"gates": str(gates), "steps": len(metrics), "tokens_per_s": tok_s, "seconds": seconds,
            "tokens": metrics[-1]["tokens_per_s"] * metrics[-1]["seconds"], "loss_first": metrics[0]["loss"],
            "loss_last": metrics[-1]["loss"], "soft_cache_last": metrics[-1]["soft_cache"]}
    return info, (f"{len(metrics)} steps in {seconds:.0f} s (with loading), {tok_s / 1e3:.1f}k tok/s "
                  f"({tok_s / 27e3:.1f}x the H100's 27k), loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}, "
                  f"soft cache {metrics[-1]['soft_cache']:.0f} vs M={recipe.loss.budget}")


def evaluate(gates: Path, args, work: Path) -> tuple[dict, str]:
    """The grid in priority order within the eval budget; returns what ran and what was left."""
    from trimkv.base_model import load_model
    from trimkv.eval.batched import run_eval_batched

    torch.backends.cuda.matmul.allow_tf32 = False          # fp32 like the CPU cells
    torch.backends.cudnn.allow_tf32 = False
    if args.dry_run:
        model, tok = load_model(str(work / "tiny-model"), dtype="float32", device="cpu")
        grid = [(name, [256], pols, None) for name, _, pols, g in GRID if g is None]
        kw = dict(budgets=[16], n_samples=2, sink=2, window=4, prefill_chunk=32)
    else:
        model, tok = load_model("smollm2", dtype="float32", device="cuda")
        grid = GRID
        kw = dict(budgets=[32, 64, 128], n_samples=args.n)
    end = time.perf_counter() + args.eval_seconds
    done, left = [], []
    for name, lengths, policies, which in grid:
        if not args.dry_run and end - time.perf_counter() < GROUP_ESTIMATE[name]:
            left.append(name)
            continue
        out = work / ("eval" if which is None else "eval-default")
        t0 = time.perf_counter()
        run_eval_batched(model, tok, batch_size=args.n if not args.dry_run else 2, tasks=["passkey"],
                         lengths=lengths, policies=policies, gates=str(which or gates), out_dir=out, progress=False,
                         **kw)
        done.append(f"{name} {time.perf_counter() - t0:.0f} s")
    table = (work / "eval" / "results.md").read_text() if (work / "eval" / "results.md").is_file() else ""
    print(table)
    return {"done": done, "left": left}, f"done: {', '.join(done)}" + (f"; left (out of time): {left}" if left else "")


# ------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="the run's folder (default: $TRIMKV_GPU_STAGE/train on "
                                                           "the GPU, runs/gpu-train-dry for a dry run)")
    p.add_argument("--out", type=Path, default=None, help="bundle and summary (default: $OUT, else --work)")
    p.add_argument("--train-seconds", type=float, default=None, help=f"training budget (default {TRAIN_S:.0f}; dry 2)")
    p.add_argument("--eval-seconds", type=float, default=EVAL_S, help="eval budget")
    p.add_argument("--n", type=int, default=40, help="prompts per eval cell (and per batch)")
    p.add_argument("--memory-fraction", type=float, default=0.8, help="GPU memory a training step may use")
    p.add_argument("--max-rows", type=int, default=64, help="cap on rows per step")
    p.add_argument("--dry-run", action="store_true", help="the same steps on this CPU, tiny")
    p.add_argument("--prepare", type=int, default=None, metavar="K", help=argparse.SUPPRESS)   # a data process
    args = p.parse_args(argv)
    args.train_seconds = args.train_seconds or (2.0 if args.dry_run else TRAIN_S)
    work = args.work or (gpu_stage.STAGE / "train" if not args.dry_run else REPO / "runs" / "gpu-train-dry")
    if args.prepare is not None:
        return prepare_component(args.prepare, args, work)
    env = gpu_parts.environment()
    print(json.dumps(env), flush=True)
    if not args.dry_run and env["gpu"] is None:
        print("gpu-train needs a CUDA GPU; DRY_RUN=1 checks the plan on a CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work)
    work.mkdir(parents=True, exist_ok=True)
    for pattern in EARLIER:             # a rerun on a warm machine starts over (the data cache stays)
        for path in work.glob(pattern):
            gpu_parts.remove(path)
    steps = Steps()
    sets = recipe_sets(args, work)
    steps.run("assemble", lambda: assemble(args.dry_run, work))
    recipe = steps.run("recipe", lambda: _recipe_step(sets), "assemble")
    t_data = time.perf_counter()
    procs = steps.run("data_start", lambda: start_data(recipe, sets, args, work), "recipe")
    sized = steps.run("size", lambda: size(recipe, args), "recipe")
    steps.run("data", lambda: finish_data(procs, recipe, t_data), "data_start")
    trained = steps.run("train", lambda: train(recipe, sets, sized, args, work), "size", "data")
    evaluated = steps.run("eval", lambda: evaluate(Path(trained["gates"]), args, work), "train")
    summary = gpu_parts.write_summary(work, env, steps.rows, {"dry_run": args.dry_run, "sized": sized,
                                                              "train": trained, "eval": evaluated})
    bundles = gpu_stage.bundle(work, out, "train", exclude=("train/checkpoints", "data-cache", "tiny-model"))
    if out != work:
        (out / "summary.txt").write_text((work / "summary.txt").read_text())
    print(f"\ngpu-train on {env['gpu'] or 'CPU (dry run)'}; results for results/gpu-{gpu_parts.machine_name(env)}/: "
          + ", ".join(b.name for b in bundles) + f"\n{summary}")
    return 0 if all(r["ok"] for r in steps.rows) else 1


def _recipe_step(sets: list[str]):
    from trimkv.recipe import load_recipe

    load_recipe(RECIPE)                          # the file as committed validates
    recipe = load_recipe(RECIPE, sets)
    return recipe, f"{RECIPE.name}: {recipe.data.seq_len} tokens a row, M={recipe.loss.budget}, {recipe.data.describe()}"


if __name__ == "__main__":
    sys.exit(main())
