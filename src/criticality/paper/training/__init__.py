"""The pieces of :func:`criticality.paper.train.train`.

config.py     TrainConfig (every field a ``criticality train`` option) and the checkpoint-epoch rule
schedules.py  learning-rate schedules over numbers (Schedule, scheduler)
precision.py  autocast mode and memory layout for GPU training
trainer.py    Trainer: one epoch, evaluation, the resume state
rundir.py     config.json (resolved, checked on resume) and log.jsonl
"""
