"""Benchmarks (not tests): each module prints a table and can write JSON (``--json PATH``).

    python -m bench.decode       # decode tokens/s and KV bytes vs context, bounded cache vs DynamicCache
    python -m bench.evict        # append+evict time as a fraction of a decode step
    python -m bench.attention    # training attention: time / peak memory of reference vs chunked (vs triton/flex)
    python -m bench.train_step   # gate-training step vs a plain frozen forward+backward

    python -m bench.gpu_plan     # a GPU visit's device commands (make gpu-stage / gpu-verify / gpu-train)

``--quick`` shrinks every size (seconds); ``--model tiny`` uses a tiny random Llama instead of the default model.
"""
