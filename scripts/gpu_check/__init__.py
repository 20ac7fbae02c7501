"""Every GPU measurement of lokr-job in one call, as one table (issue 17; DESIGN §6).

    bash scripts/gpu_check.sh              # on the lent GPU machine (installs the carried wheels first)
    bash scripts/gpu_check.sh --dry-run    # anywhere: the same code on the CPU with the tiny model (CI)

Rows (``rows.py``): training steps of a full-size AuraFlow v0.3 transformer with random bf16 weights built
on the GPU, at 1024 px with batch 1 and the seed's LoKr, in each precision and offload configuration: the
median s/step, the ratio to the physical floor (``flops.py``), peak memory, and ``lokr-job check``'s VRAM
estimate with the ratio measured/estimated. Then the tiny job through the real CLI, once straight through
and once stopped by SIGTERM and resumed: same adapter bytes or not (``tiny_job.py``).

Each row runs in a worker process (``worker.py``, ``measure.py``) under a time budget kept by the
supervisor (``supervise.py``): a row that runs out of time, runs out of memory or kills its worker is
reported as such and the rest go on. The table is printed and written as gpu_check.md and gpu_check.json
under ``--out`` ($OUT on the device machine).
"""
