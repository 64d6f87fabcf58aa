"""Fresh draws for re-randomization: one whole-model draw vs a per-group draw of every group.

    PYTHONPATH=src python benchmarks/bench_draws.py           # both, each in its own process
    PYTHONPATH=src python benchmarks/bench_draws.py groups    # one of them

On an HF Llama (8 layers, hidden 512, 112 MiB, random config; needs transformers), prints the seconds
and the peak RSS above the process's baseline (taken after building the model), in model sizes. The
per-group draws hold one group's tensors at a time (the rest of the copy is on the meta device).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import torch


def measure(mode: str) -> None:
    import transformers as T

    from criticality.core import groups, surgery

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                             max_position_embeddings=64))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # bytes
    members = groups.resolve(model, "blocks").members
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = time.perf_counter()
    if mode == "whole":
        surgery.fresh_state(model, "hf", 0)
    else:
        for keys in members.values():
            surgery.fresh_group(model, "hf", 0, keys)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{mode:>6}: {secs:.2f} s, peak RSS +{(peak - base) / size:.2f} model sizes "
          f"(model {size / 2**20:.0f} MiB, {len(members)} groups)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        for mode in ("whole", "groups"):
            subprocess.run([sys.executable, __file__, mode], check=True)
