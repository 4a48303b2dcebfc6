"""The three architectures of the independent digits pools, each with its permutation spec and fusion levels.

Every model is a whole 10-class classifier of 8×8 digits given as 64 pixels (the task pool's input), its head
included. Each class says which tensor axes share a permutation of hidden units (`permutation_spec`), where those
units can be observed (activation points) and how the model splits into fusion levels, so every fusion method works
from the spec alone:

- `MLPClassifier`: 64 → 128 → 128 → 10 with ReLU (Git Re-Basin's MNIST MLP, narrower). Permutations: the hidden
  units of fc1 and fc2. Levels: fc1, fc2, fc3.
- `CNNClassifier`: VGG-style, 3×3 convolutions with ReLU and 2×2 max pooling, no batch norm (OTFusion's VGG
  recipe): 8×8 → conv 16 → pool → 4×4 → conv 32 → pool → 2×2 → conv 64 → pool → 1×1 → linear 10. Permutations: the
  output channels of each convolution. Levels: the three convolutions and the classifier.
- `ViTClassifier`: patches of 4×4 pixels (4 tokens and a class token; 2×2 patches give 16), width 64, 2 pre-norm
  blocks with 4 heads of 16 and an MLP of 128 (GELU), LayerNorm and a linear head on the class token. Permutations:
  the residual stream (one permutation shared by the embedding, every block and the head), the heads of each
  attention (blocks of 16 rows of q, k, v and columns of the output projection) and the hidden units of each MLP, as
  the reference implementations permute transformers. Levels: the embedding, each block (residual) and the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mergebench_core.fusion.alignment import Level, PermutationSpec, mlp_permutation_spec

ARCHS = ("mlp", "cnn", "vit")


class MLPClassifier(nn.Module):
    """The whole classifier is the model (the head included): 64 → hidden → hidden → 10 with ReLU."""

    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    @staticmethod
    def permutation_spec() -> PermutationSpec:
        """The two hidden layers' units: `P_fc1` (fc1's outputs, fc2's inputs) and `P_fc2` (fc2's outputs, fc3's
        inputs); the 10 class logits stay in place. Points: the layers' pre-activations (ReLU is functional here, and
        matching pre-activations is what HF/KF fusion does too)."""
        base = mlp_permutation_spec(["fc1", "fc2", "fc3"])
        return PermutationSpec(base.axes, points={"P_fc1": ("fc1",), "P_fc2": ("fc2",)},
                               levels=(Level("fc1"), Level("fc2"), Level("fc3")))


class CNNClassifier(nn.Module):
    """VGG-style: [conv 3×3 → ReLU → max-pool 2×2] × 3, then a linear classifier on the 1×1×C map."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), classes: int = 10):
        super().__init__()
        if len(channels) != 3:
            raise ValueError("the 8×8 digits allow three 2×2 poolings: give three channel counts")
        self.channels = tuple(channels)
        c_in = 1
        for i, c in enumerate(channels, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c, 3, padding=1))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.pool(self.relu3(self.conv3(x)))
        return self.fc(x.flatten(1))

    @staticmethod
    def permutation_spec() -> PermutationSpec:
        """`P_conv<i>`: the output channels of conv i (its weight's rows and bias, the next layer's input channels).
        Points: the ReLU after each convolution (NCHW: features on axis 1). Levels: the convolutions (pre-activation
        outputs) and the classifier."""
        axes: dict[str, tuple[str | None, ...]] = {}
        previous: str | None = None
        for i in (1, 2, 3):
            p = f"P_conv{i}"
            axes[f"conv{i}.weight"] = (p, previous, None, None)
            axes[f"conv{i}.bias"] = (p,)
            previous = p
        axes["fc.weight"] = (None, previous)
        axes["fc.bias"] = (None,)
        feature_axes = {m: 1 for i in (1, 2, 3) for m in (f"conv{i}", f"relu{i}")}
        return PermutationSpec(axes, points={f"P_conv{i}": (f"relu{i}",) for i in (1, 2, 3)},
                               feature_axes=feature_axes,
                               levels=(Level("conv1"), Level("conv2"), Level("conv3"), Level("fc")))


class PatchEmbed(nn.Module):
    """8×8 image → (batch, 1 + patches, dim): a linear map of each patch, a class token first, learned positions."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        if 8 % patch:
            raise ValueError(f"patch size {patch} does not tile an 8×8 image")
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.proj = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.patch, 8 // self.patch
        x = x.reshape(-1, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(-1, n * n, p * p)
        x = self.proj(x)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections; `heads` (an identity) marks the
    concatenated head outputs, so activation matching can observe each head."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.n_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.o(self.heads(out))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """LayerNorm and a linear classifier on the class token."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x[:, 0]))


class ViTClassifier(nn.Module):
    def __init__(self, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, mlp_hidden: int = 128,
                 classes: int = 10):
        super().__init__()
        self.config = dict(patch=patch, dim=dim, depth=depth, heads=heads, mlp_hidden=mlp_hidden)
        self.embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_hidden) for _ in range(depth))
        self.head = Head(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def permutation_spec(self) -> PermutationSpec:
        """`P_res`: the residual stream (embedding outputs, every LayerNorm, the inputs of q, k, v and the MLPs, the
        outputs of the attention and MLP projections, the head's input); `P_heads<i>`: the heads of block i, in blocks
        of dim/heads entries; `P_mlp<i>`: the MLP hidden units of block i. Points: the embedding and block outputs
        (residual stream), the concatenated head outputs, the MLP's GELU. Levels: embedding, blocks (residual), head."""
        depth, dim, heads = self.config["depth"], self.config["dim"], self.config["heads"]
        r = "P_res"
        axes: dict[str, tuple[str | None, ...]] = {
            "embed.proj.weight": (r, None), "embed.proj.bias": (r,),
            "embed.cls": (None, None, r), "embed.pos": (None, None, r),
        }
        blocks, points = {}, {r: ("embed", *(f"blocks.{i}" for i in range(depth)))}
        for i in range(depth):
            b, ph, pm = f"blocks.{i}", f"P_heads{i}", f"P_mlp{i}"
            axes |= {f"{b}.ln1.weight": (r,), f"{b}.ln1.bias": (r,)}
            for proj in ("q", "k", "v"):
                axes |= {f"{b}.attn.{proj}.weight": (ph, r), f"{b}.attn.{proj}.bias": (ph,)}
            axes |= {f"{b}.attn.o.weight": (r, ph), f"{b}.attn.o.bias": (r,)}
            axes |= {f"{b}.ln2.weight": (r,), f"{b}.ln2.bias": (r,)}
            axes |= {f"{b}.mlp.fc1.weight": (pm, r), f"{b}.mlp.fc1.bias": (pm,),
                     f"{b}.mlp.fc2.weight": (r, pm), f"{b}.mlp.fc2.bias": (r,)}
            blocks[ph] = dim // heads
            points |= {ph: (f"{b}.attn.heads",), pm: (f"{b}.mlp.act",)}
        axes |= {"head.ln.weight": (r,), "head.ln.bias": (r,), "head.fc.weight": (None, r), "head.fc.bias": (None,)}
        levels = (Level("embed"), *(Level(f"blocks.{i}", residual=True) for i in range(depth)), Level("head"))
        return PermutationSpec(axes, blocks=blocks, points=points, levels=levels)


def build_model(arch: str, **config) -> nn.Module:
    """A fresh model of `arch` ("mlp", "cnn" or "vit") with the given architecture parameters."""
    if arch == "mlp":
        return MLPClassifier(**config)
    if arch == "cnn":
        return CNNClassifier(**config)
    if arch == "vit":
        return ViTClassifier(**config)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
