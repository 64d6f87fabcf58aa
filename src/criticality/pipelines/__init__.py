"""The jobs the CLI runs, composed from the core, the paper's zoo and the output.

    grid.py             plan -> run -> finish -> describe -> extras -> tables, once (resumable, torchrun-aware)
    extras.py           the ops outside the grid: module criticality, proxies
    analyze_run.py      `criticality analyze RUN`: a training run directory
    run_experiment.py   `criticality run KEY`: train, analyse, draw, report a registered experiment
    analyze_hf.py       `criticality analyze-hf`: Hugging Face checkpoint folders on a local data file
    lm_experiment.py    the journal's Transformer LM experiment at CPU scale
"""
