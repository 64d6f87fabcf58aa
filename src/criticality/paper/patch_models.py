"""Small in-house ViT and MLP-Mixer: the journal version's patch models, at a size a CPU trains.

    build("vit-tiny", (1, 28, 28), 10, width=64)    # 4 pre-norm blocks, dim 64, 2 heads, 4x4 patches
    build("mixer-tiny", (3, 32, 32), 10, width=64)  # 4 Mixer blocks, dim 64

The paper's ViT-B/16, L/16 and Mixer are ImageNet-21k models; these keep their structure (patch
embedding, pre-norm residual blocks, a norm + linear head) at 4 blocks and a width of ``width``
channels. Patches are 4×4 pixels (2×2 for inputs under 16 pixels). Both follow the zoo contract of
:mod:`criticality.paper.models`:

- groups, one per sub-layer (the journal analyses the Transformer LM so): ``embed`` (patch conv, and
  the ViT's class token and position embedding), per block ``blockI.norm1``, ``blockI.attn`` (ViT) /
  ``blockI.token_mix`` (Mixer), ``blockI.norm2``, ``blockI.mlp.fc1``, ``blockI.mlp.fc2``, then
  ``head.norm`` and ``head.fc``;
- stages: ``embed``, ``block1`` .. ``block4``, ``head`` (each group lies inside one of them).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DEPTH = 4  # blocks
Stages = list[tuple[str, nn.Module]]


def patch_size(h: int, w: int) -> int:
    return 4 if min(h, w) >= 16 else 2


class PatchEmbed(nn.Module):
    """(N, C, H, W) → (N, T, D) tokens, T = (H/p)(W/p); the ViT adds a class token and positions."""

    def __init__(self, in_channels: int, dim: int, patch: int, tokens: int, cls: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, patch, stride=patch)  # (N, D, H/p, W/p)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        self.pos = nn.Parameter(torch.zeros(1, tokens + int(cls), dim)) if cls else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The class token and positions (ViT: truncated normal, std 0.02); the conv is its own module."""
        for p in (self.cls, self.pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).flatten(2).transpose(1, 2)  # (N, T, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos  # (N, T + 1, D)
        return x


class MLP(nn.Module):
    """Linear → GELU → Linear over the last axis."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.MultiheadAttention):
    """Self-attention that returns only the output tensor (N, T, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False)[0]


class TokenMix(nn.Module):
    """The Mixer's token-mixing MLP: the same MLP over the token axis for every channel."""

    def __init__(self, tokens: int, hidden: int):
        super().__init__()
        self.mlp = MLP(tokens, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm residual block: x + mix(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, mix: nn.Module, mix_name: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.add_module(mix_name, mix)
        self.mix_name = mix_name
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        x = x + getattr(self, self.mix_name)(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """LayerNorm, then the class token (ViT) or the token mean (Mixer), then a Linear: (N, T, D) → (N, K)."""

    def __init__(self, dim: int, num_classes: int, pool: str):
        super().__init__()
        self.norm, self.fc, self.pool = nn.LayerNorm(dim), nn.Linear(dim, num_classes), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


class PatchNet(nn.Module):
    """ViT (``kind="vit"``) or MLP-Mixer (``kind="mixer"``): embed, DEPTH blocks, head."""

    def __init__(self, kind: str, input_shape: tuple[int, int, int], num_classes: int, width: int):
        super().__init__()
        c, h, w = input_shape
        p = patch_size(h, w)
        tokens = (h // p) * (w // p)
        self.embed = PatchEmbed(c, width, p, tokens, cls=kind == "vit")
        for i in range(1, DEPTH + 1):
            if kind == "vit":
                mix, name = SelfAttention(width, max(1, width // 32), batch_first=True), "attn"
            else:
                mix, name = TokenMix(tokens, max(2 * tokens, 8)), "token_mix"
            self.add_module(f"block{i}", Block(width, mix, name))
        self.head = Head(width, num_classes, "cls" if kind == "vit" else "mean")

    def stages(self) -> Stages:
        return list(self.named_children())

    def layer_groups(self) -> dict[str, list[str]]:
        groups = OrderedDict(embed=["embed"])
        for name, block in self.named_children():
            if name.startswith("block"):
                for sub in ("norm1", block.mix_name, "norm2", "mlp.fc1", "mlp.fc2"):
                    groups[f"{name}.{sub}"] = [f"{name}.{sub}"]
        groups["head.norm"], groups["head.fc"] = ["head.norm"], ["head.fc"]
        return dict(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, module in self.stages():
            x = module(x)
        return x
