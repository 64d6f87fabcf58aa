"""Small architectures for the analysis tests: each exercises one thing the core must get right.

Imported by the tests; nothing here runs on its own.
"""

from __future__ import annotations

import torch
from torch import nn


def fcn() -> nn.Module:
    """A plain chain: nn.Sequential, so the engine caches prefixes without being told."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def bias_free() -> nn.Module:
    """A layer without bias and a LayerNorm after it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 20, bias=False), nn.LayerNorm(20), nn.ReLU(),
                         nn.Linear(20, 5))


def convbn() -> nn.Module:
    """Conv + BatchNorm: running statistics must travel with their layer."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv(torch.relu(self.bn(x)))


class Residual(nn.Module):
    """A residual net that declares its chain of stages and its layer groups, like the zoo models."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block1, self.block2 = Block(6), Block(6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def stages(self):
        return [("stem", self.stem), ("block1", self.block1), ("block2", self.block2), ("head", self.head)]

    def layer_groups(self):
        return {"stem": ["stem"], "block1": ["block1"], "block2": ["block2"], "head": ["head"]}

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


class Tied(nn.Module):
    """Two layers share one weight tensor; no declared chain (the engine's full-forward fallback)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(36, 12)
        self.mid1 = nn.Linear(12, 12)
        self.mid2 = nn.Linear(12, 12)
        self.mid2.weight = self.mid1.weight  # tied: one tensor, two state-dict keys
        self.cls = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = torch.relu(self.mid2(torch.relu(self.mid1(h))))
        return self.cls(h)


ARCHS = {"fcn": fcn, "bias_free": bias_free, "convbn": convbn, "residual": Residual, "tied": Tied}


# ---- models whose declared chain is NOT their forward: the engine must notice and not cache prefixes ----

class ReluBetweenStages(nn.Module):
    """forward applies F.relu between two declared stages."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def stages(self):
        return [("flat", nn.Flatten()), ("fc1", self.fc1), ("fc2", self.fc2), ("fc3", self.fc3)]

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class SkipAcrossStages(ReluBetweenStages):
    """A skip connection from fc1's output to fc3's input, across declared stages."""

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(h + torch.relu(self.fc2(h)))


class ResidualSequential(nn.Sequential):
    """An nn.Sequential subclass with its own (residual) forward."""

    def __init__(self):
        super().__init__(nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        h = self[1](self[0](x.flatten(1)))
        return self[4](h + self[3](self[2](h)))


class Mislabelled(nn.Module):
    """A chain that is right but names its stages wrongly: positions must come from the tensors."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.act = nn.ReLU()

    def stages(self):
        return [("flat", nn.Flatten()), ("fc2", nn.Sequential(self.fc1, self.act)),
                ("fc1", nn.Sequential(self.fc2, self.act)), ("fc3", self.fc3)]

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


def shared_twice() -> nn.Module:
    """One Linear registered twice in a Sequential (named_children would drop the second use)."""
    shared = nn.Linear(16, 16)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                         nn.Linear(16, 5))


def inplace_first() -> nn.Module:
    """A stage that starts with an in-place op on its input (LeakyReLU inplace is not idempotent)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16),
                         nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(16, 16)),
                         nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(16, 5)))


class StagesAttribute(nn.Module):
    """`stages` is a submodule, not the chain method (as in some timm models)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.stages(x))


TRICKY = {"relu_between": ReluBetweenStages, "skip_across": SkipAcrossStages, "residual_seq": ResidualSequential,
          "mislabelled": Mislabelled, "shared_twice": shared_twice, "inplace_first": inplace_first,
          "stages_attribute": StagesAttribute}


# ---- models that copy timm's patterns (timm itself cannot be installed next to this torch) ----

class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D/heads)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x):
        return x * self.gamma


class TimmBlock(nn.Module):
    """timm's pre-norm ViT block: norm1 -> attn -> ls1, norm2 -> mlp -> ls2."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), TimmAttention(dim), LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(nn.Module):
    """timm's VisionTransformer layout: raw cls_token / pos_embed parameters, a ``blocks`` Sequential."""

    pretrained_cfg: dict = {}  # timm's marker: re-randomization picks the "timm" scheme

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 5):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 3, stride=3)  # (N, 1, 6, 6) -> (N, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.Sequential(*[TimmBlock(dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = x.reshape(-1, 1, 6, 6)
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, 4, dim)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1) + self.pos_embed  # (N, 5, dim)
        return self.head(self.norm(self.blocks(h))[:, 0])


class TimmBasicBlock(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                           if stride != 1 or c_in != c else None)

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class TimmResNet(nn.Module):
    """timm's ResNet layout: conv1/bn1 stem, ``layer1`` .. ``layer4`` Sequentials, zero-init last BN, fc."""

    pretrained_cfg: dict = {}

    def __init__(self, width: int = 4, classes: int = 5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        c = width
        for i in range(1, 5):
            out = width * 2 ** ((i - 1) // 2)
            self.add_module(f"layer{i}", nn.Sequential(TimmBasicBlock(c, out, 1 if i == 1 else 2),
                                                       TimmBasicBlock(out, out)))
            c = out
        self.fc = nn.Linear(c, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x.reshape(-1, 1, 6, 6))))
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
        return self.fc(h.mean((2, 3)))


TIMM_LIKE = {"timm_vit": TimmViT, "timm_resnet": TimmResNet}


# ---- real Hugging Face transformers classes, tiny random configs (transformers is a test dependency) ----

def hf_models() -> dict:
    """name -> (builder, example inputs maker): Llama (GQA, rotary), GPT-2 (tied), BERT, ViT, ResNet."""
    import transformers as T

    def ids(n, g):
        return torch.randint(0, 64, (n, 6), generator=g)

    def pixels(size):
        return lambda n, g: torch.randn(n, 1, size, size, generator=g)

    return {
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)), ids),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2)), ids),
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=3)), ids),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=3)), pixels(8)),
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
            num_labels=3)), pixels(16)),
    }


class Logits(nn.Module):
    """An HF model as a plain classifier for this branch's engine: ``x -> logits (N, classes)``.

    A causal LM predicts the next token after the sequence (its last position's logits, (N, vocab)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x):
        out = self.m(x).logits
        return out[:, -1] if out.dim() == 3 else out
