"""Training retention gates, one module per job (read them in this order):

* :mod:`.step`        - ``training_step``: teacher and student forwards, ``loss = KL + NTP + lambda * capacity``.
* :mod:`.optim`       - AdamW and the warm-up + cosine schedule, the same for every engine.
* :mod:`.engines`     - how a step runs on 1..N devices: plain PyTorch, DDP, DeepSpeed ZeRO.
* :mod:`.distributed` - rank, world size and device of this process; the few collectives.
* :mod:`.loop`        - optimiser steps with metrics (``metrics.jsonl``, wandb), progress and checkpoints.
* :mod:`.state`       - atomic training checkpoints and exact resume.
* :mod:`.rundir`      - what a run folder holds: one run per folder, metrics truncated on resume, gates another run
  exported never replaced unless told.
* :mod:`.run`         - ``finetune``: a recipe end to end (what ``trimkv train`` runs on every rank).
"""
