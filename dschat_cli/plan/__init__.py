"""`dschat plan`: GPU memory per GPU and the batch/step counts of a run, before it runs.

    arch.py      model shapes and exact parameter counts from config.json
    memory.py    the memory model (per model, per phase), following DeepSpeed's allocations
    planner.py   run config -> estimate, step counts in words, suggestions; the GPUs to compare with
    report.py    rich tables, JSON, and the lines each training command prints before launch
    command.py   what `dschat plan sft|reward|dpo|ppo|pipeline` runs

No torch import anywhere in this package.
"""
