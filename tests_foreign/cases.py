"""The architectures of the matrix: one tiny, randomly initialized config per timm family and per transformers
architecture class, with a few examples of the data it takes. Nothing is downloaded.

``CASES`` maps a path-like key (``timm/resnet``, ``hf/llama``) to a :class:`Case`; ``case.build()`` returns
``(model, data)`` with the model freshly drawn from a fixed seed (the same weights on every call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

N = 8  # examples per case: one batch covers them all
CLASSES = 10
IMAGE = 32  # pixels per side, the smallest size every timm family below builds at
VOCAB = 128
TOKENS = 12  # sequence length of the token cases
TARGET_TOKENS = 6  # decoder sequence length of the encoder-decoder cases


@dataclass(frozen=True)
class Case:
    package: str  # "timm" or "transformers"
    family: str  # what the table calls it
    make: Callable[[], nn.Module]
    data: str  # "image", "pixel_values", "causal", "classify", "seq2seq", "speech"

    def build(self) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model = self.make()
        return model, DATA[self.data](model)


# ---- data of each kind (a fixed generator, so every call gives the same examples)

def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _images(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen()
    return torch.randn(N, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (N,), generator=g)


def _pixel_values(model: nn.Module) -> dict[str, torch.Tensor]:
    x, y = _images(model)
    return {"pixel_values": x, "labels": y}


def _causal(model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (N, TOKENS), generator=_gen())
    return {"input_ids": ids, "labels": ids.clone()}


def _classify(model: nn.Module) -> dict[str, torch.Tensor]:
    g = _gen()
    ids = torch.randint(4, VOCAB, (N, TOKENS), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (N,), generator=g)}


def _seq2seq(model: nn.Module) -> dict[str, torch.Tensor]:
    g = _gen()
    ids = torch.randint(4, VOCAB, (N, TOKENS), generator=g)
    mask = torch.ones_like(ids)
    mask[N // 2:, TOKENS - 3:] = 0  # half the sources padded: labels must not be masked by this
    labels = torch.randint(4, VOCAB, (N, TARGET_TOKENS), generator=g)  # (N, 6): shorter than the sources
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _speech(model: nn.Module) -> dict[str, torch.Tensor]:
    g = _gen()
    frames = 2 * model.config.max_source_positions  # Whisper's conv stem halves the frames
    return {"input_features": torch.randn(N, model.config.num_mel_bins, frames, generator=g),
            "labels": torch.randint(4, VOCAB, (N, TARGET_TOKENS), generator=g)}


DATA: dict[str, Callable[[nn.Module], Any]] = {
    "image": _images, "pixel_values": _pixel_values, "causal": _causal, "classify": _classify,
    "seq2seq": _seq2seq, "speech": _speech,
}


# ---- timm: the smallest registered variant of each family, cut down where the family takes the arguments

def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
    return make


def _timm_class(module: str, cls: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A timm model class built directly, where the registered variants fix the arguments we cut down."""
    def make() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"timm.models.{module}"), cls)(num_classes=CLASSES, **kwargs)
    return make


VIT = dict(img_size=IMAGE, patch_size=8, depth=4)  # 16 patches, 4 blocks
TIMM: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "resnet": ("ResNet (resnet10t)", _timm("resnet10t")),
    "resnext": ("ResNeXt (resnext50_32x4d, 1 block per stage)", _timm("resnext50_32x4d", layers=(1, 1, 1, 1))),
    "resnetv2": ("ResNetV2 (resnetv2_50, 1 block per stage)", _timm("resnetv2_50", layers=(1, 1, 1, 1))),
    "regnet": ("RegNet (regnetx_002)", _timm("regnetx_002")),
    "densenet": ("DenseNet (densenet121, growth 8, 2 layers per block)",
                 _timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2))),
    "efficientnet": ("EfficientNet (test_efficientnet)", _timm("test_efficientnet")),
    "mobilenetv3": ("MobileNetV3 (mobilenetv3_small_050)", _timm("mobilenetv3_small_050")),
    "mobilenetv4": ("MobileNetV4 (mobilenetv4_conv_small)", _timm("mobilenetv4_conv_small")),
    "ghostnet": ("GhostNet (ghostnet_050)", _timm("ghostnet_050")),
    "convnext": ("ConvNeXt (test_convnext)", _timm("test_convnext")),
    "vit": ("ViT (vit_tiny, patch 8, 4 blocks)", _timm("vit_tiny_patch16_224", **VIT)),
    "deit-distilled": ("DeiT distilled (deit_tiny_distilled, patch 8, 4 blocks)",
                       _timm("deit_tiny_distilled_patch16_224", **VIT)),
    "swin": ("Swin (swin_tiny, window 4, depths 2-2)",
             _timm("swin_tiny_patch4_window7_224", img_size=IMAGE, window_size=4, embed_dim=24, depths=(2, 2),
                   num_heads=(1, 2))),
    "mlp-mixer": ("MLP-Mixer (MlpMixer, patch 8, 4 blocks)",
                  _timm_class("mlp_mixer", "MlpMixer", img_size=IMAGE, patch_size=8, num_blocks=4, embed_dim=64)),
    "poolformer": ("PoolFormer / MetaFormer (poolformer_s12)", _timm("poolformer_s12")),
    "levit": ("LeViT (levit_128s)", _timm("levit_128s", img_size=IMAGE)),
    "efficientformerv2": ("EfficientFormerV2 (efficientformerv2_s0)", _timm("efficientformerv2_s0", img_size=IMAGE)),
    "fastvit": ("FastViT (fastvit_t8)", _timm("fastvit_t8")),
    "coatnet": ("CoAtNet (test_coatnet)", _timm("test_coatnet", img_size=IMAGE)),
    "maxvit": ("MaxViT (test_maxvit)", _timm("test_maxvit", img_size=IMAGE)),
    "eva": ("EVA-02 (eva02_tiny, patch 8, 4 blocks)", _timm("eva02_tiny_patch14_224", **VIT)),
    "xcit": ("XCiT (xcit_nano_12_p8, 4 blocks)", _timm("xcit_nano_12_p8_224", img_size=IMAGE, depth=4)),
    "nfnet": ("NFNet (test_nfnet)", _timm("test_nfnet")),
    "inception-next": ("Inception-NeXt (inception_next_atto)", _timm("inception_next_atto")),
    "cait": ("CaiT (cait_xxs24, patch 8, 4 blocks)", _timm("cait_xxs24_224", **VIT)),
    "beit": ("BEiT (beit_base, patch 8, 4 blocks, width 64)",
             _timm("beit_base_patch16_224", **VIT, embed_dim=64, num_heads=2)),
    "pvt-v2": ("PVT-v2 (pvt_v2_b0)", _timm("pvt_v2_b0")),
    "mobilevit": ("MobileViT (mobilevit_xxs)", _timm("mobilevit_xxs")),
    "efficientvit-mit": ("EfficientViT MIT (efficientvit_b0)", _timm("efficientvit_b0")),
    "efficientvit-msra": ("EfficientViT MSRA (efficientvit_m0)", _timm("efficientvit_m0", img_size=IMAGE)),
    "byobnet": ("ByobNet (test_byobnet)", _timm("test_byobnet")),
    "dla": ("DLA (dla46_c)", _timm("dla46_c")),
    "mobileone": ("MobileOne (mobileone_s0)", _timm("mobileone_s0")),
    "tinynet": ("TinyNet (tinynet_e)", _timm("tinynet_e")),
    "lcnet": ("LCNet (lcnet_050)", _timm("lcnet_050")),
    "mnasnet": ("MnasNet (mnasnet_small)", _timm("mnasnet_small")),
    "edgenext": ("EdgeNeXt (edgenext_xx_small)", _timm("edgenext_xx_small")),
    "mambaout": ("MambaOut (test_mambaout)", _timm("test_mambaout")),
    "starnet": ("StarNet (starnet_s050)", _timm("starnet_s050")),
    "fasternet": ("FasterNet (fasternet_t0)", _timm("fasternet_t0")),
    "hgnetv2": ("HGNetV2 (hgnetv2_b0)", _timm("hgnetv2_b0")),
    "repghost": ("RepGhostNet (repghostnet_050)", _timm("repghostnet_050")),
    "pit": ("PiT (pit_ti)", _timm("pit_ti_224", img_size=IMAGE)),
    "convit": ("ConViT (convit_tiny, patch 8, 4 blocks)", _timm("convit_tiny", **VIT)),
    "coat": ("CoaT-Lite (coat_lite_tiny)", _timm("coat_lite_tiny", img_size=IMAGE)),
    "twins": ("Twins-PCPVT (twins_pcpvt_small, 1 block per stage)", _timm("twins_pcpvt_small", depths=(1, 1, 1, 1))),
    "res2net": ("Res2Net (res2net50_14w_8s, 1 block per stage)", _timm("res2net50_14w_8s", layers=(1, 1, 1, 1))),
    "resnest": ("ResNeSt (resnest14d)", _timm("resnest14d")),
    "vovnet": ("VoVNet (ese_vovnet19b_slim)", _timm("ese_vovnet19b_slim")),
    "sequencer": ("Sequencer2D (sequencer2d_s, 1 block per stage)", _timm("sequencer2d_s", layers=(1, 1, 1, 1))),
}


# ---- transformers: every architecture class a tiny config builds offline

TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


def _hf(cls: str, model_type: str, **overrides: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        config = transformers.AutoConfig.for_model(model_type, **overrides)
        return getattr(transformers, cls)(config)
    return make


def _lm(cls: str, model_type: str, **overrides: Any) -> Callable[[], nn.Module]:
    return _hf(cls, model_type, **{**TINY, **overrides})


VISION = dict(image_size=IMAGE, num_channels=3, num_labels=CLASSES)
HF: dict[str, tuple[str, Callable[[], nn.Module], str]] = {
    "gpt2": ("GPT2LMHeadModel", _hf("GPT2LMHeadModel", "gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=64), "causal"),
    "gpt-neox": ("GPTNeoXForCausalLM", _lm("GPTNeoXForCausalLM", "gpt_neox"), "causal"),
    "opt": ("OPTForCausalLM", _lm("OPTForCausalLM", "opt", ffn_dim=64, word_embed_proj_dim=32), "causal"),
    "bloom": ("BloomForCausalLM", _hf("BloomForCausalLM", "bloom", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                       n_head=2), "causal"),
    "falcon": ("FalconForCausalLM", _lm("FalconForCausalLM", "falcon"), "causal"),
    "llama": ("LlamaForCausalLM", _lm("LlamaForCausalLM", "llama", num_key_value_heads=1), "causal"),
    "mistral": ("MistralForCausalLM", _lm("MistralForCausalLM", "mistral", num_key_value_heads=1), "causal"),
    "qwen2": ("Qwen2ForCausalLM", _lm("Qwen2ForCausalLM", "qwen2", num_key_value_heads=1), "causal"),
    "qwen3": ("Qwen3ForCausalLM", _lm("Qwen3ForCausalLM", "qwen3", num_key_value_heads=1, head_dim=16), "causal"),
    "gemma": ("GemmaForCausalLM", _lm("GemmaForCausalLM", "gemma", num_key_value_heads=1, head_dim=16), "causal"),
    "gemma2": ("Gemma2ForCausalLM", _lm("Gemma2ForCausalLM", "gemma2", num_key_value_heads=1, head_dim=16),
               "causal"),
    "phi": ("PhiForCausalLM", _lm("PhiForCausalLM", "phi"), "causal"),
    "phi3": ("Phi3ForCausalLM", _lm("Phi3ForCausalLM", "phi3", pad_token_id=0), "causal"),
    "stablelm": ("StableLmForCausalLM", _lm("StableLmForCausalLM", "stablelm", num_key_value_heads=2), "causal"),
    "gpt-bigcode": ("GPTBigCodeForCausalLM", _hf("GPTBigCodeForCausalLM", "gpt_bigcode", vocab_size=VOCAB, n_embd=32,
                                                 n_layer=2, n_head=2, n_positions=64), "causal"),
    "gptj": ("GPTJForCausalLM", _hf("GPTJForCausalLM", "gptj", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=64, rotary_dim=8), "causal"),
    "codegen": ("CodeGenForCausalLM", _hf("CodeGenForCausalLM", "codegen", vocab_size=VOCAB, n_embd=32, n_layer=2,
                                           n_head=2, n_positions=64, n_ctx=64, rotary_dim=8), "causal"),
    "olmo": ("OlmoForCausalLM", _lm("OlmoForCausalLM", "olmo", pad_token_id=0), "causal"),
    "olmo2": ("Olmo2ForCausalLM", _lm("Olmo2ForCausalLM", "olmo2", pad_token_id=0), "causal"),
    "starcoder2": ("Starcoder2ForCausalLM", _lm("Starcoder2ForCausalLM", "starcoder2", num_key_value_heads=1),
                   "causal"),
    "granite": ("GraniteForCausalLM", _lm("GraniteForCausalLM", "granite"), "causal"),
    "mamba": ("MambaForCausalLM", _hf("MambaForCausalLM", "mamba", vocab_size=VOCAB, hidden_size=32,
                                       num_hidden_layers=2, state_size=4, expand=2), "causal"),
    "mixtral": ("MixtralForCausalLM", _lm("MixtralForCausalLM", "mixtral", num_key_value_heads=1, num_local_experts=4,
                                          num_experts_per_tok=2), "causal"),
    "qwen2-moe": ("Qwen2MoeForCausalLM", _lm("Qwen2MoeForCausalLM", "qwen2_moe", num_key_value_heads=1, num_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=32), "causal"),
    "bert": ("BertForSequenceClassification", _lm("BertForSequenceClassification", "bert"), "classify"),
    "roberta": ("RobertaForSequenceClassification", _lm("RobertaForSequenceClassification", "roberta", pad_token_id=1),
                "classify"),
    "distilbert": ("DistilBertForSequenceClassification",
                   _hf("DistilBertForSequenceClassification", "distilbert", vocab_size=VOCAB, dim=32, n_layers=2,
                       n_heads=2, hidden_dim=64, max_position_embeddings=64), "classify"),
    "albert": ("AlbertForSequenceClassification", _lm("AlbertForSequenceClassification", "albert", embedding_size=16),
               "classify"),
    "electra": ("ElectraForSequenceClassification", _lm("ElectraForSequenceClassification", "electra",
                                                        embedding_size=16), "classify"),
    "deberta-v2": ("DebertaV2ForSequenceClassification", _lm("DebertaV2ForSequenceClassification", "deberta-v2"),
                   "classify"),
    "t5": ("T5ForConditionalGeneration", _hf("T5ForConditionalGeneration", "t5", vocab_size=VOCAB, d_model=32, d_kv=16,
                                              d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0),
           "seq2seq"),
    "bart": ("BartForConditionalGeneration", _hf("BartForConditionalGeneration", "bart", vocab_size=VOCAB, d_model=32,
                                                  encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                  max_position_embeddings=64), "seq2seq"),
    "whisper": ("WhisperForConditionalGeneration",
                _hf("WhisperForConditionalGeneration", "whisper", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                    decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                    decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                    decoder_start_token_id=1, pad_token_id=0), "speech"),
    "vit": ("ViTForImageClassification", _hf("ViTForImageClassification", "vit", **VISION, patch_size=8,
                                              hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64), "pixel_values"),
    "deit": ("DeiTForImageClassification", _hf("DeiTForImageClassification", "deit", **VISION, patch_size=8,
                                                hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64), "pixel_values"),
    "swin": ("SwinForImageClassification", _hf("SwinForImageClassification", "swin", **VISION, patch_size=2,
                                                window_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2]),
             "pixel_values"),
    "convnext": ("ConvNextForImageClassification", _hf("ConvNextForImageClassification", "convnext", **VISION,
                                                       hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                 "pixel_values"),
    "resnet": ("ResNetForImageClassification", _hf("ResNetForImageClassification", "resnet", **VISION,
                                                   embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
               "pixel_values"),
}

CASES: dict[str, Case] = {
    **{f"timm/{key}": Case("timm", family, make, "image") for key, (family, make) in TIMM.items()},
    **{f"hf/{key}": Case("transformers", family, make, data) for key, (family, make, data) in HF.items()},
}
