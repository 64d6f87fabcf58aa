"""Cases expected to fail today, each with the reason and the item of issue 22 whose fix makes it pass.

The matrix marks them ``xfail(strict=True)``: once a fix lands the case passes, the XPASS turns the run red,
and its entry here must go. Everything not listed must pass. The exact messages are in the table
(docs/architectures.md) and in the test's assertion.
"""

LM = "default metrics refuse sequence logits: 'error' is for classifiers (issue 22 item 2)"
LM_SKIP = LM + "; skip blames the data for a block that returns a tuple (item 4)"
LAYER_SCALE = "the 'timm' draw scheme does not draw layer-scale parameters (issue 22 item 5)"
SKIP_TUPLE = "skip blames the data: the shape probe's hook replaces a block's tuple output (issue 22 item 4)"
ENC_DEC = "encoder-decoder: labels taken from the model's inputs; proxies raise a plain ValueError (issue 22 item 3)"

KNOWN: dict[str, str] = {
    **{f"hf/{name}": LM for name in (
        "gpt2", "gpt-neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "stablelm",
        "gpt-bigcode", "gptj", "codegen", "olmo", "olmo2", "starcoder2", "granite", "mamba", "mixtral", "qwen2-moe")},
    "hf/opt": LM + "; final_layer_norm listed before layers.0 (item 8)",
    "hf/bloom": LM_SKIP,
    "hf/falcon": LM_SKIP,
    "hf/albert": "groups in registration order: token_type_embeddings after position_embeddings (issue 22 item 8)",
    "hf/deberta-v2": SKIP_TUPLE,
    "hf/swin": SKIP_TUPLE,
    "hf/t5": ENC_DEC,
    "hf/bart": ENC_DEC + "; BART builds its decoder inputs from input_ids, scored against 6-token labels",
    "hf/whisper": ENC_DEC,
    **{f"timm/{name}": LAYER_SCALE for name in ("convnext", "cait", "edgenext", "poolformer", "fastvit",
                                                "inception-next")},
    "timm/xcit": LAYER_SCALE + " nor XCiT's attn.temperature (item 6)",
    "timm/levit": "stale attention_bias_cache: fast != naive on reinit stages.1.downsample@0 (issue 22 item 1)",
    "timm/efficientformerv2": "stale attention_bias_cache: fast != naive and != a fresh model on reinit "
                              "stages.3.downsample@0 (issue 22 item 1)",
    "timm/hgnetv2": "the 'timm' draw scheme does not draw the learnable affine lab.scale / lab.bias (issue 22 item 6)",
    "timm/convit": "the 'timm' draw scheme does not draw attn.gating_param (issue 22 item 6)",
    "timm/coat": "the 'timm' draw scheme does not draw cls_token1..4 (issue 22 item 6)",
    "timm/fasternet": "groups out of forward order: each stage's downsample listed after its blocks (issue 22 item 8)",
    "timm/twins": "groups out of forward order: one pos_block group for all stages, listed last (issue 22 items 7, 8)",
}
