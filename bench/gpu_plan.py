"""The GPU visit as device commands: what each carries, its size against the 64 MiB limit, its timeout and how long
it should take.

    python -m bench.gpu_plan            # the plan, checked against what is staged now (DRY_RUN=1 prints it too)
    python -m bench.gpu_plan stage      # = make gpu-stage: wheels and GGUF parts sized to this plan

A visit is at most 15 minutes of device time, a command at most 600 s and 64 MiB (the working tree that travels with
every command, plus the paths it carries). The default model's GGUF (~98 MB) does not fit one command beside the
working tree (~27 MB), so it travels in parts, one per command, and waits in ``/tmp`` on the machine, which keeps it
while the machine stays warm (30 s after a command: make the next call at once). The commands, in order:

1. ``make gpu-verify`` carries the wheels and part 0;
2. ``make gpu-stage-part`` (seconds) for every part that fits neither command around it;
3. ``make gpu-train`` carries the last part and joins them.

Each command is what the device tool's ``run`` gets (``command``, ``carry``, ``timeout_s``); :func:`describe` prints
them ready to paste. Sizes are measured here, now: files added to the repository before the visit change them, so
stage again right before it.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from . import gpu_stage, gpu_train, gpu_verify
except ImportError:  # python bench/gpu_plan.py
    import gpu_stage
    import gpu_train
    import gpu_verify

REPO = gpu_stage.REPO
DEVICE_BUDGET_S = 15 * 60          # device time of a session, starts and idle waits included
COMMAND_LIMIT_S = 600              # one command
START_S = 120                      # a cold machine's start (the tool's README: "a minute or more")
TRANSFER_S = 15                    # sending ~60 MiB and the files back
RECEIVE_S = {"verify": 20, "stage": 3, "train": 5}   # bench.gpu_stage receive: wheels installed once, parts copied
MANIFEST_REL = ".gguf_parts/MANIFEST.json"


@dataclass
class Call:
    """One device command of the visit."""

    name: str
    command: str
    carry: list[str]
    timeout_s: int
    estimate_s: float
    carried_bytes: int = 0             # working tree + carried paths (expected sizes for what is not staged yet)


def shell(target: str) -> str:
    """The command line: ``make TARGET``, or the same script when the image has no ``make``."""
    step = target.removeprefix("gpu-").removesuffix("-part")
    return f"if command -v make >/dev/null; then make {target}; else sh bench/gpu_visit.sh {step}; fi"


def verify_estimate() -> float:
    return min(gpu_verify.BUDGET_S, sum(p.estimate_s for p in gpu_verify.parts())) + 15   # + imports, bundle


def train_estimate() -> float:
    groups = sum(gpu_train.GROUP_ESTIMATE[name] for name, *_ in gpu_train.GRID)
    return sum(gpu_train.OVERHEAD_S.values()) + gpu_train.TRAIN_S * 1.1 + min(gpu_train.EVAL_S, groups)


WHEELS_GUESS = 5 * 2**20           # what .whl/ holds once staged (measured: 4.4 MiB)


def part_capacities(tree: int | None = None, wheels: int | None = None, gguf_bytes: int | None = None) -> list[int]:
    """Bytes of GGUF each command can carry, in order: [verify (beside the wheels), stage..., train], as many stage
    commands as the GGUF needs."""
    tree = gpu_stage.tree_bytes() if tree is None else tree
    wheels = (gpu_stage.size(gpu_stage.WHEEL_DIR) or WHEELS_GUESS) if wheels is None else wheels
    room = gpu_stage.LIMIT - gpu_stage.MARGIN - tree - 64 * 1024          # 64 KiB: the manifest and slack
    first = room - wheels
    if gguf_bytes is None:
        gguf = gpu_stage.gguf_path()
        gguf_bytes = gguf.stat().st_size if gguf.is_file() else 100 * 2**20
    if first <= 0:
        raise gpu_stage.StageError(f"the working tree alone is {tree / 2**20:.1f} MiB (+{wheels / 2**20:.1f} MiB of "
                                   "wheels): no room for the model in a 64 MiB command; carry less")
    caps, have = [first], first
    while have < gguf_bytes:
        caps.append(room)
        have += room
    return caps


def plan(tree: int | None = None, repo: Path = REPO) -> list[Call]:
    """The visit's commands for the staged parts, or, before staging, for the parts staging would make."""
    tree = gpu_stage.tree_bytes(repo) if tree is None else tree
    manifest_path = repo / MANIFEST_REL
    if manifest_path.is_file():
        manifest = gpu_stage.read_manifest(manifest_path)
        parts = [(f".gguf_parts/{p['name']}", p["bytes"]) for p in manifest["parts"]]
    else:
        caps = part_capacities(tree)
        gguf = gpu_stage.gguf_path()
        left, parts = gguf.stat().st_size if gguf.is_file() else 100 * 2**20, []
        for k, cap in enumerate(caps):
            parts.append((f".gguf_parts/part-{k}", min(cap, left)))
            left -= min(cap, left)
    if len(parts) < 2:
        parts.append((".gguf_parts/part-1", 0))
    expected = {".whl": gpu_stage.size(repo / ".whl") or WHEELS_GUESS, MANIFEST_REL: 2048, **dict(parts)}

    def call(name, target, carry, timeout, estimate):
        carried = tree + sum(gpu_stage.size(repo / c) if (repo / c).exists() else expected[c] for c in carry)
        return Call(name, shell(target), carry, timeout, estimate, carried)

    names = [name for name, _ in parts]
    calls = [call("verify", "gpu-verify", [".whl", MANIFEST_REL, names[0]], 420, RECEIVE_S["verify"] + verify_estimate())]
    for k, part in enumerate(names[1:-1], start=1):
        calls.append(call(f"stage-{k}", "gpu-stage-part", [MANIFEST_REL, part], 120, RECEIVE_S["stage"]))
    calls.append(call("train", "gpu-train", [MANIFEST_REL, names[-1]], 560, RECEIVE_S["train"] + train_estimate()))
    return calls


def check(calls: list[Call], repo: Path = REPO) -> list[str]:
    """Problems of the plan, each naming its fix (empty: the plan holds)."""
    problems = []
    for call in calls:
        missing = [c for c in call.carry if not (repo / c).exists()]
        if missing:
            problems.append(f"{call.name}: {missing} not staged yet: run make gpu-stage")
        if call.carried_bytes > gpu_stage.LIMIT:
            problems.append(f"{call.name}: carries {call.carried_bytes / 2**20:.1f} MiB, over the 64 MiB a command may: "
                            "run make gpu-stage again (it sizes the parts to the working tree of now)")
        if call.estimate_s > call.timeout_s or call.timeout_s > COMMAND_LIMIT_S:
            problems.append(f"{call.name}: estimated {call.estimate_s:.0f} s against a timeout of {call.timeout_s} s "
                            f"(at most {COMMAND_LIMIT_S}): cut its budget")
    total = visit_seconds(calls)
    if total > DEVICE_BUDGET_S:
        problems.append(f"the visit is estimated at {total:.0f} s, over the {DEVICE_BUDGET_S} s of device time: cut "
                        "the verify or train budgets")
    return problems


def visit_seconds(calls: list[Call]) -> float:
    return START_S + sum(c.estimate_s + TRANSFER_S for c in calls)


def describe(calls: list[Call], repo: Path = REPO) -> str:
    tree = gpu_stage.tree_bytes(repo)
    lines = [f"GPU visit: {len(calls)} device commands, in order, each at once after the last (the machine keeps /tmp "
             f"only while warm). Working tree: {tree / 2**20:.1f} MiB in every command.", ""]
    for k, call in enumerate(calls, 1):
        lines.append(f"{k}. {call.name}: ~{call.estimate_s:.0f} s, carries {call.carried_bytes / 2**20:.1f} MiB of 64")
        lines.append(f"   run(command={call.command!r}, carry={call.carry}, timeout_s={call.timeout_s})")
    lines += ["", f"estimate: ~{visit_seconds(calls) / 60:.1f} min of device time of {DEVICE_BUDGET_S // 60} (a cold "
                  f"start ~{START_S} s, {TRANSFER_S} s of transfers per command); guesses until a visit measures them",
              "if the machine went back between commands (status: warm false), the parts in /tmp went with it: carry "
              "each part again with make gpu-stage-part (the first with .whl) before make gpu-train, whose error names "
              "the missing ones",
              "afterwards, here: python -m bench.gpu_stage unpack <files_at of each command> results/gpu-<machine>"]
    problems = check(calls, repo)
    lines += ["", "plan holds" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default="show", choices=["show", "stage"],
                   help="show: print and check the plan; stage: build the wheels and parts for it (needs the index)")
    args = p.parse_args(argv)
    try:
        if args.what == "stage":
            wheels = gpu_stage.build_wheels()
            print(f"{len(wheels)} wheels in {gpu_stage.WHEEL_DIR} ({gpu_stage.size(gpu_stage.WHEEL_DIR) / 2**20:.1f} MiB)")
            manifest = gpu_stage.split_gguf(part_capacities())
            print(f"{manifest['gguf']} in {len(manifest['parts'])} parts: "
                  + ", ".join(f"{q['name']} {q['bytes'] / 2**20:.1f} MiB" for q in manifest["parts"]))
        calls = plan()
    except gpu_stage.StageError as err:
        print(f"gpu_plan: {err}", file=sys.stderr)
        return 2
    print(describe(calls))
    return 0 if not check(calls) else 1


if __name__ == "__main__":
    sys.exit(main())
