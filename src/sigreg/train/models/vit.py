"""Vision Transformers: ``paper-vit`` (2-D RoPE, token-mean pooling) and ``peak-vit`` (CLS token,
learned absolute positions, stochastic depth).

Shapes: B batch, T tokens, D model width, H heads, Dh = D / H head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sigreg.train.models.registry import check_positive, register_model


# --------------------------------------------------------------------------- 2-D rotary embedding
def rope_2d_angles(rows: Tensor, cols: Tensor, head_dim: int, base: float = 10000.0) -> Tensor:
    """Rotation angles for 2-D RoPE.

    rows, cols: (T,) patch row / column index of each token.
    Returns (T, head_dim // 2): one angle per pair of channels. The first half of the pairs turns
    with the row index, the second half with the column index; each half uses the standard RoPE
    frequencies ``base ** (-2i / (head_dim / 2))`` for its ``head_dim / 2`` channels.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
    return angles.float()


def apply_rotary(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x (..., T, Dh) by angles (T, Dh // 2).

    A rotation by ``pos * freq`` makes <rot(q, p), rot(k, p')> depend only on p - p'.
    """
    # Read each pair as a complex number: rotating by theta = multiplying by e^{i theta}. One
    # complex multiply is several times faster on CPU than the equivalent real slicing + stack.
    dtype = torch.promote_types(x.dtype, torch.float32)  # complex half/bf16 is poorly supported
    pairs = torch.view_as_complex(x.to(dtype).reshape(*x.shape[:-1], -1, 2))
    angles = angles.to(dtype)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class Rope2D(nn.Module):
    """Precomputed 2-D RoPE for a fixed ``grid x grid`` patch layout (row-major token order)."""

    def __init__(self, grid: int, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        pos = torch.arange(grid)
        rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)  # token t = row * grid + col
        # Non-persistent: derived from the config, so it stays out of checkpoints.
        self.register_buffer("angles", rope_2d_angles(rows, cols, head_dim, base), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, T, Dh) -> same shape, rotated."""
        return apply_rotary(x, self.angles)


# --------------------------------------------------------------------------- transformer pieces
class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole residual branch per sample with prob ``p``
    (scaling survivors by 1 / (1 - p) so the expectation is unchanged). Identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, ...) -> same shape."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; optional RoPE on q, k."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Rope2D | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:  # positions enter only through q.k, hence only relatively
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, rope: Rope2D | None = None) -> Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------- the model
class ViT(nn.Module):
    """Vision Transformer over non-overlapping ``patch_size`` patches of a square image.

    Input (B, in_channels, image_size, image_size) -> logits (B, num_classes).
    Position information comes from ``rope`` (2-D rotary, relative) and/or ``abs_pos`` (learned,
    added to the tokens). ``cls_token=True`` classifies from a prepended CLS token, otherwise from
    the mean of the (final-LN'd) patch tokens.

    SIGReg hooks: every block's output (B, T, D), pooled by token mean ("mean"). With a CLS token,
    T includes it -- the CLS token is one more token in the mean.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        in_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        abs_pos: bool = False,
        cls_token: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(
            num_classes=num_classes, image_size=image_size, in_channels=in_channels,
            patch_size=patch_size, dim=dim, depth=depth, heads=heads,
        )  # fmt: skip
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size}); "
                f"e.g. 28x28 works with patch_size 4 (7x7 tokens) or 7 (4x4 tokens)"
            )
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if rope and cls_token:
            # The CLS token has no grid position to rotate by.
            raise ValueError("rope together with a CLS token is not supported")
        self.image_size, self.patch_size = image_size, patch_size
        grid = image_size // patch_size
        num_tokens = grid * grid + int(cls_token)

        # A Linear over flattened patches == a Conv2d with stride = kernel = patch_size.
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim)) if abs_pos else None
        self.rope = Rope2D(grid, dim // heads, rope_base) if rope else None
        # Stochastic depth grows linearly over depth: 0 for the first block, drop_path_rate last.
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

        self.sigreg_layers: list[str] = [f"blocks.{i}" for i in range(depth)]
        self.sigreg_pool = "mean"
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT convention: small truncated-normal weights (cut at +-2 std), zero biases.
        std = 0.02
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, T, C * p * p), tokens in row-major patch order."""
        b, c, h, w = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {h}x{w}")
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, S, S) -> logits (B, num_classes)."""
        x = self.patch_embed(self.patchify(x))  # (B, T, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x, self.rope)
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)


# --------------------------------------------------------------------------- registered configs
@register_model("paper-vit")
def paper_vit(
    *,
    num_classes: int,
    image_size: int,
    in_channels: int,
    patch_size: int = 4,
    dim: int = 256,
    depth: int = 6,
    heads: int = 8,
    mlp_ratio: float = 2.0,
    rope_base: float = 10000.0,
) -> ViT:
    """The paper's ViT: 2-D RoPE (no absolute positions, no CLS), token-mean pooling, no qkv bias,
    no dropout. ~3.17M parameters at the defaults (CIFAR-10)."""
    return ViT(
        num_classes=num_classes, image_size=image_size, in_channels=in_channels,
        patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
        qkv_bias=False, rope=True, rope_base=rope_base,
    )  # fmt: skip


@register_model("peak-vit")
def peak_vit(
    *,
    num_classes: int,
    image_size: int,
    in_channels: int,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 9,
    heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.1,
) -> ViT:
    """A stronger, conventional ViT: CLS token, learned absolute positions, qkv bias, stochastic
    depth rising 0 -> ``drop_path_rate``. ~4.03M parameters at the defaults (CIFAR-10)."""
    return ViT(
        num_classes=num_classes, image_size=image_size, in_channels=in_channels,
        patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
        qkv_bias=True, abs_pos=True, cls_token=True, drop_path_rate=drop_path_rate,
    )  # fmt: skip
