"""Print the layer groups `criticality` forms for a tiny Llama and a tiny ViT (Hugging Face transformers).

    PYTHONPATH=src python examples/show_groups.py > docs/groups_generated.md

Prints Markdown: for each model and each spec ("blocks", "sublayers", "auto"), one line per group with
the modules whose tensors it holds (relative to the group's common path; the second block's groups,
which repeat the first's, left out). Needs transformers;
random tiny configs, nothing downloaded; runs in a few seconds on a CPU.
"""

from __future__ import annotations

import torch
import transformers as T

from criticality.core import groups


def tiny_llama() -> torch.nn.Module:
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                            pad_token_id=0, bos_token_id=1, eos_token_id=2))


def tiny_vit() -> torch.nn.Module:
    return T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                   num_labels=3))


def describe(model: torch.nn.Module, spec: str) -> list[str]:
    """One Markdown list item per group: ``name``: the modules whose tensors it holds, and raw tensors by
    name (``cls_token``), relative to the group's common path. Groups of the second and later blocks
    are left out (they repeat the first's)."""
    lines = []
    for name, keys in groups.resolve(model, spec).members.items():
        if ".layers.1" in name:
            continue
        usual = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        modules = list(dict.fromkeys(k.rpartition(".")[0] if k.rpartition(".")[2] in usual else k for k in keys))
        common = _common_path(modules)
        rel = [m[len(common) + 1:] if len(m) > len(common) else m.rpartition(".")[2] for m in modules]
        lines.append(f"- `{name}`: {', '.join(f'`{r}`' for r in rel)}")
    return lines


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for step in zip(*parts, strict=False):
        if len(set(step)) > 1:
            break
        common.append(step[0])
    return ".".join(common)


def main() -> None:
    torch.manual_seed(0)
    for title, model in (("Llama (`LlamaForCausalLM`, 2 layers, GQA)", tiny_llama()),
                         ("ViT (`ViTForImageClassification`, 2 layers)", tiny_vit())):
        print(f"### {title}\n")
        print(f"Default spec: `{groups.default_spec(model)}`\n")
        for spec in ("blocks", "sublayers", "auto"):
            print(f"#### groups=\"{spec}\"\n")
            print("\n".join(describe(model, spec)) + "\n- … the same for `layers.1`\n")


if __name__ == "__main__":
    main()
