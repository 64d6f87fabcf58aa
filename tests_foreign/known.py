"""Cases expected to fail today, each with the reason and the item of issue 22 whose fix makes it pass.

The matrix marks them ``xfail(strict=True)``: once a fix lands the case passes, the XPASS turns the run red,
and its entry here must go. Everything not listed must pass. The exact messages are in the table
(docs/architectures.md) and in the test's assertion.
"""

ENC_DEC = "encoder-decoder: labels taken from the model's inputs; proxies raise a plain ValueError (issue 22 item 3)"

KNOWN: dict[str, str] = {
    "hf/opt": "groups in registration order: final_layer_norm listed before layers.0 (issue 22 item 8)",
    "hf/albert": "groups in registration order: token_type_embeddings after position_embeddings (issue 22 item 8)",
    "hf/t5": ENC_DEC,
    "hf/bart": ENC_DEC + "; BART builds its decoder inputs from input_ids, scored against 6-token labels",
    "hf/whisper": ENC_DEC,
    "timm/coat": "the 'timm' draw scheme does not draw cls_token1..4 (issue 22 item 6)",
    "timm/fasternet": "groups out of forward order: each stage's downsample listed after its blocks (issue 22 item 8)",
    "timm/twins": "groups out of forward order: one pos_block group for all stages, listed last (issue 22 items 7, 8)",
}
