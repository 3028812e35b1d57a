"""sra2.py: SiT + SRA 2 (VAE Self-Representation Alignment) in one readable file.

SRA 2 (CVPR 2026, "VAE Self-Representation Alignment for Efficient Diffusion Training") trains a
SiT (Ma et al. 2024: a DiT with an interpolant and a velocity loss on VAE latents) with one extra
branch: the tokens h of an early block go through a small MLP P and are pulled, with smooth-L1
(beta 0.05), toward f_VAE, the clean VAE latent z of the same image, laid out as tokens. The latent
is what the model denoises anyway, so the target costs nothing. At inference P is dropped and what
remains is a plain SiT. Start reading at `training_loss`; above it are SiT, the projector P and
the interpolant it uses, below it the samplers and small utilities (EMA, device, precision).
Importing the file runs nothing; `python sra2.py --bench` times it.

Conventions (the sources in this field disagree; this file follows REPA, which SRA 2 builds on):
    t = 0 is data, t = 1 is noise.  Linear path: x_t = (1 - t) * z + t * eps,  v = eps - z.
    (SiT's own code and checkpoints run the other way, tau = 1 - t: see `SiTTimeFlip`.)
Symbols:
    z      clean VAE latent (N, C, H, W), also f_VAE, the alignment target
    eps    Gaussian noise, same shape as z
    x_t    noisy latent at time t;  v  velocity d x_t / d t;  s  score grad log p_t(x_t)
    h      hidden tokens (N, T, D) after block `align_depth` (1-indexed)
    P      the projector, tokens (N, T, D) -> (N, T, p*p*C)
Shape letters: N batch, C latent channels, H W latent height and width, p patch size,
    T = (H/p) * (W/p) tokens, D hidden width.
"""
import argparse
import copy
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------------


@dataclass
class SiTConfig:
    input_size: int = 32            # latent H = W (32 for ImageNet 256 with the SD-VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152         # D
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # labels replaced by the null label in training (for CFG)
    num_classes: int = 1000          # label num_classes is the null label
    learn_sigma: bool = False        # True in SiT's released checkpoints: 2C output channels, the
                                     # extra C are never trained and are dropped in forward
    align_depth: int = 8             # SRA 2: block whose output h is aligned (1-indexed)


def _preset(depth, hidden_size, num_heads, patch_size):
    # The paper aligns block 2 for S and B (12 blocks) and block 8 for L and XL (24, 28 blocks).
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
                align_depth=2 if depth == 12 else 8)


PRESETS = {
    f"SiT-{size}/{p}": _preset(depth, width, heads, p)
    for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12),
                                        "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items()
    for p in (2, 4, 8)
}


def create_sit(name, **overrides):
    """SiT from a paper name ("SiT-B/2") plus any SiTConfig field, e.g. input_size=16."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(SiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown SiTConfig field(s): {', '.join(sorted(unknown))}")
    return SiT(SiTConfig(**{**PRESETS[name], **overrides}))


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def sincos_1d(dim, pos):
    """(len(pos), dim) table [sin(pos * omega), cos(pos * omega)], omega_k = 1 / 10000^(2k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device="cpu") / (dim / 2))
    angles = pos.reshape(-1, 1).double() * omega                    # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)          # (L, dim)


def sincos_2d(dim, grid_size):
    """(grid_size**2, dim) fixed position table, tokens in row-major (h, w) order.
    First half of the channels encodes the column w, second half the row h (as in DiT/SiT)."""
    # On the CPU in float64 (MPS has no float64), then copied into the model's pos_embed.
    index = torch.arange(grid_size, device="cpu")
    rows, cols = torch.meshgrid(index, index, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D): a p x p conv with stride p, one token per patch."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)             # (N, D, H/p, W/p) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (raw, no x1000) -> 256 sinusoidal frequencies [cos, sin] -> MLP -> (N, D)."""

    def __init__(self, hidden_size, freq_dim=256, max_period=10000):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.freq_dim, self.max_period = freq_dim, max_period

    def forward(self, t):
        # Frequencies made on every call, in float32 (as SiT): a buffer would be left uninitialised
        # by meta-device loading and rounded by model.to(bfloat16). torch.compile folds this away.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]                  # (N, 128)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))  # cos first, as SiT


class LabelEmbedder(nn.Module):
    """Class label -> (N, D). Row num_classes is the null label; in training each label becomes
    the null label with probability class_dropout_prob, which is what makes CFG possible."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        # As in DiT/SiT, the null row exists only when labels are dropped in training.
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, drop=None):
        """drop (N,) bool: which labels become the null label. None: in training, a fresh draw
        with probability dropout_prob. Given (DiT's force_drop_ids), it is used as is."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
        if drop is not None:
            if self.embedding_table.num_embeddings == self.num_classes:
                raise ValueError("a label-dropout mask was given, but the model has no null label "
                                 "(class_dropout_prob is 0)")
            if drop.shape != y.shape or drop.dtype != torch.bool:
                raise ValueError(f"the label-dropout mask must be bool {tuple(y.shape)}, "
                                 f"got {drop.dtype} {tuple(drop.shape)}")
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


# ---------------------------------------------------------------------------------------------
# Transformer block with adaLN-Zero
# ---------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    """adaLN: x (N, T, D), shift and scale (N, D) from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, head dim D / heads, fused SDPA kernel."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)             # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)                # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))       # (N, T, heads, d) -> (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """x += gate * Attn(modulate(LN(x))); x += gate * MLP(modulate(LN(x))), all from c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)               # 6 x (N, D)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LN, modulate, Linear(D, p*p*C_out): one p x p x C_out patch per token, (p, q, c) order."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# Patch layout: the token order shared by the model output and the alignment target f_VAE
# ---------------------------------------------------------------------------------------------


def patchify(x, p):
    """(N, C, H, W) -> (N, T, p*p*C), tokens row-major, each a patch in (p, q, c) order (c fastest).
    Exactly the inverse of `unpatchify`, so f_VAE tokens line up with the model's output tokens."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p)                      # (N, C, h, p, w, q)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)  # (N, h*w, p*q*C)


def unpatchify(tokens, p, H, W):
    """(N, T, p*p*C) -> (N, C, H, W), the layout of SiT's final layer."""
    N, T, _ = tokens.shape
    x = tokens.reshape(N, H // p, W // p, p, p, -1)                # (N, h, w, p, q, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, -1, H, W)        # (N, C, h, p, w, q) -> (N, C, H, W)


# ---------------------------------------------------------------------------------------------
# SiT
# ---------------------------------------------------------------------------------------------


class SiT(nn.Module):
    """SiT with the official parameter names: released SiT and REPA checkpoints load with strict=True.
    model(x_t, t, y) -> velocity v (N, C, H, W); t = 0 data, t = 1 noise."""

    def __init__(self, config: SiTConfig):
        super().__init__()
        cfg = self.config = config
        if cfg.input_size % cfg.patch_size:
            raise ValueError(f"input_size {cfg.input_size} is not divisible by patch {cfg.patch_size}")
        if cfg.hidden_size % cfg.num_heads or cfg.hidden_size % 4:
            raise ValueError(f"hidden_size {cfg.hidden_size} must divide by num_heads and by 4")
        if not 1 <= cfg.align_depth <= cfg.depth:
            raise ValueError(f"align_depth {cfg.align_depth} is outside the model's 1..{cfg.depth}")
        D, grid = cfg.hidden_size, cfg.input_size // cfg.patch_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Frozen, but a Parameter (not a buffer) so that the checkpoint keys match SiT's.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, D), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The official initialisation. The zeroed adaLN and final layers make the output exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_2d(self.config.hidden_size, self.config.input_size // self.config.patch_size))
        w = self.x_embedder.proj.weight                            # init the conv like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))            # on its (D, C*p*p) view
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t, t, y, return_hidden_at=None, drop_labels=None):
        """x_t (N, C, H, W), t (N,) in [0, 1] (0 = data), y (N,) labels, num_classes = null label.
        Returns v (N, C, H, W); with return_hidden_at=k also h (N, T, D), the output of block k.
        drop_labels (N,) bool: the label-dropout draw, if the caller makes it (see LabelEmbedder)."""
        t = self.check_inputs(x_t, t, y)
        x = self.x_embedder(x_t) + self.pos_embed                  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, drop_labels)   # (N, D) conditioning
        h = None
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if depth == return_hidden_at:                          # SRA 2 taps h here, for free
                h = x
        v = unpatchify(self.final_layer(x, c), self.config.patch_size, *x_t.shape[2:])
        v = v[:, :self.config.in_channels]                         # learn_sigma: drop the unused half
        return v if return_hidden_at is None else (v, h)

    def check_inputs(self, x_t, t, y):
        """Clear errors instead of a wrong answer or an opaque shape error deep inside.
        Shapes are checked always (free). Values cost one host sync per forward: a few tens of
        microseconds against a training step of tens of milliseconds, so kept in eager mode (a bad
        label on CUDA would otherwise be an opaque device assert); skipped inside torch.compile,
        where a sync would break the graph."""
        cfg, n_labels = self.config, self.y_embedder.embedding_table.num_embeddings
        if x_t.ndim != 4 or x_t.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must be (N, {cfg.in_channels}, H, W), got {tuple(x_t.shape)}")
        if x_t.shape[2] % cfg.patch_size or x_t.shape[3] % cfg.patch_size:
            raise ValueError(f"x_t size {tuple(x_t.shape[2:])} is not divisible by patch {cfg.patch_size}")
        if tuple(x_t.shape[2:]) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"x_t is {tuple(x_t.shape[2:])}, the model was built for "
                             f"input_size {cfg.input_size} (its position table is fixed)")
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if t.shape != (x_t.shape[0],) or y.shape != (x_t.shape[0],):
            raise ValueError(f"t and y must be (N,) = ({x_t.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"labels y must be integers, got {y.dtype}")
        if torch.compiler.is_compiling() or x_t.is_meta:           # meta: shapes only, no values
            return t
        bad = torch.stack([(y < 0).any() | (y >= n_labels).any(),
                           ~torch.isfinite(t).all() | (t < 0).any() | (t > 1).any(),
                           ~torch.isfinite(x_t).all()]).tolist()     # one host sync for all three
        if bad[0]:
            raise ValueError(f"labels must be in [0, {n_labels - 1}] ({cfg.num_classes} = null label"
                             f"{'' if n_labels > cfg.num_classes else ', absent: class_dropout_prob is 0'})")
        if bad[1]:
            raise ValueError("t must be finite and in [0, 1] (t = 0 data, t = 1 noise)")
        if bad[2]:
            raise ValueError("x_t contains NaN or Inf")
        return t


class SiTTimeFlip(nn.Module):
    """Run a model trained in SiT's own time direction with this file's samplers.
    SiT's code uses tau = 1 - t (tau = 1 data) and predicts u = z - eps, so v(x, t) = -u(x, 1 - t).
    Use: `sample_sde(SiTTimeFlip(released_sit), noise, y)`."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x_t, t, y):
        return -self.model(x_t, 1 - t, y)


def load_sit_checkpoint(model, checkpoint):
    """Load a SiT or REPA checkpoint (path or dict) into `model` with strict=True.
    Picks "ema", then "model" if the file holds several state dicts; REPA's `projectors.*` keys
    are returned, not loaded (P is dropped at inference). Time direction: see SiTTimeFlip."""
    if not isinstance(checkpoint, dict):                           # REPA's files hold its argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint.get("ema", checkpoint.get("model", checkpoint))
    projector_state = {k: v for k, v in state.items() if k.startswith("projectors.")}
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    rows = state.get("final_layer.linear.weight", torch.empty(0)).shape[0]
    if rows and rows != model.final_layer.linear.weight.shape[0]:
        raise ValueError(f"checkpoint predicts {rows} values per token, the model "
                         f"{model.final_layer.linear.weight.shape[0]}: set learn_sigma="
                         f"{rows == 2 * model.final_layer.linear.weight.shape[0]}")
    model.load_state_dict(state, strict=True)
    return projector_state


# ---------------------------------------------------------------------------------------------
# SRA 2: the projector P
# ---------------------------------------------------------------------------------------------


class Projector(nn.Module):
    """Token-wise MLP P: (N, T, D) -> (N, T, out_dim). `depth` Linear layers with SiLU between.
    A separate module, so the SiT state dict stays plain and P is simply dropped after training.
    Initialised as REPA's projectors (xavier-uniform weights, zero biases)."""

    def __init__(self, in_dim, out_dim, depth=5, width=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        width = width or 2 * in_dim
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        layers = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.SiLU()]
        self.mlp = nn.Sequential(*layers[:-1])                     # no activation after the last
        for layer in self.mlp[::2]:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h):
        return self.mlp(h)


def make_projector(model, depth=5, width=None):
    """P for this SiT: D -> p*p*C, one clean latent patch per token. Default: 5 layers of width 2D
    (8.3M parameters at B/2, the paper's "8M"); depth=2 gives 1.2M (the paper's "1M")."""
    cfg = model.config
    return Projector(cfg.hidden_size, cfg.patch_size ** 2 * cfg.in_channels, depth, width)


# ---------------------------------------------------------------------------------------------
# Interpolant and losses
# ---------------------------------------------------------------------------------------------

PATHS = ("linear", "cosine")


def path_coefficients(t, path="linear"):
    """x_t = alpha_t * z + sigma_t * eps (t = 0 data). Returns alpha_t, sigma_t, d alpha/dt, d sigma/dt."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path == "cosine":                                           # the GVP path of SiT
        a = t * (math.pi / 2)
        return a.cos(), a.sin(), -(math.pi / 2) * a.sin(), (math.pi / 2) * a.cos()
    raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")


def interpolate(z, eps, t, path="linear"):
    """t = 0 data. Returns x_t and the velocity target v = d x_t / dt (linear: x_t = (1-t) z + t eps, v = eps - z)."""
    alpha, sigma, d_alpha, d_sigma = (c.reshape(-1, *[1] * (z.ndim - 1)) for c in path_coefficients(t, path))
    return alpha * z + sigma * eps, d_alpha * z + d_sigma * eps


def score_from_velocity(v, x_t, t, path="linear"):
    """s = grad log p_t(x_t) = -eps_hat / sigma_t, with eps_hat solved from x_t and v.
    Linear path (t = 0 data): s = -((1 - t) v + x_t) / t."""
    alpha, sigma, d_alpha, d_sigma = (c.reshape(-1, *[1] * (x_t.ndim - 1)) for c in path_coefficients(t, path))
    eps_hat = (alpha * v - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)
    return -eps_hat / sigma


ALIGN_LOSSES = ("smooth_l1", "cosine", "l1", "l2")


def alignment_loss(f_sit, f_vae, kind="smooth_l1", beta=0.05):
    """Per-sample alignment loss (N,) between P(h) = f_sit and the target f_vae, both (N, T, d).
    smooth-L1 per element: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = f_sit - f_vae;
    averaged over T and d. cosine: 1 - cos(f_sit, f_vae) per token, averaged over T."""
    if f_sit.shape != f_vae.shape:
        raise ValueError(f"projector output {tuple(f_sit.shape)} and target {tuple(f_vae.shape)} differ")
    dtype = torch.promote_types(f_sit.dtype, torch.float32)        # float32 at least, under autocast
    f_sit, f_vae = f_sit.to(dtype), f_vae.to(dtype)
    if kind == "smooth_l1":
        per_element = F.smooth_l1_loss(f_sit, f_vae, beta=beta, reduction="none")
    elif kind == "l1":
        per_element = (f_sit - f_vae).abs()
    elif kind == "l2":
        per_element = (f_sit - f_vae).square()
    elif kind == "cosine":
        per_element = 1 - F.cosine_similarity(f_sit, f_vae, dim=-1)   # (N, T)
    else:
        raise ValueError(f"unknown alignment loss {kind!r}; choose one of {ALIGN_LOSSES}")
    return per_element.flatten(1).mean(1)


def training_loss(model, z, y, projector=None, *, lam=1.0, align_depth=None, align_loss="smooth_l1",
                  t_range=(0.0, 1.0), target=None, path="linear", t=None, eps=None, drop_labels=None):
    """The SRA 2 objective: L = L_denoise + lam * L_align, from one forward pass at one t.

    z (N, C, H, W) clean latents (t = 0 is data), y (N,) labels. projector=None: plain SiT (align = 0).
    The alignment target is f_VAE = z itself, as tokens, or `target` (N, T, d) from any encoder
    (REPA-style). With a t_range, the alignment term is the mean over the samples whose t lies
    inside it (so each of them weighs more than with the full range; lam keeps its meaning as
    the weight of a per-sample average). t, eps and the label-dropout mask drop_labels (N,) may
    be given (tests; data-parallel training, where each rank takes its share of one global draw);
    by default t ~ U[0, 1), eps ~ N(0, I) and the dropout come from the global RNG.
    Returns {"loss", "denoise", "align"}."""
    cfg = getattr(model, "module", model).config                   # unwrap DistributedDataParallel
    t_dtype = torch.promote_types(z.dtype, torch.float32)          # never bf16 times
    t = torch.rand(z.shape[0], device=z.device, dtype=t_dtype) if t is None else t
    eps = torch.randn_like(z) if eps is None else eps
    x_t, v_target = interpolate(z, eps, t, path)                   # x_t = (1-t) z + t eps, v = eps - z
    drop = {} if drop_labels is None else dict(drop_labels=drop_labels)   # other SiTs lack the kwarg
    if projector is None:
        v = model(x_t, t, y, **drop)
        align = z.new_zeros(())
    else:
        k = align_depth or cfg.align_depth
        if not 1 <= k <= cfg.depth:
            raise ValueError(f"align_depth {k} is outside the model's 1..{cfg.depth}")
        v, h = model(x_t, t, y, return_hidden_at=k, **drop)        # h (N, T, D) after block k
        f_sit = projector(h)                                       # P(h) (N, T, p*p*C)
        f_vae = patchify(z, cfg.patch_size) if target is None else target   # (N, T, p*p*C), (p, q, c)
        per_sample = alignment_loss(f_sit, f_vae, align_loss)      # (N,)
        in_range = ((t >= t_range[0]) & (t <= t_range[1])).float()
        align = (per_sample * in_range).sum() / in_range.sum().clamp(min=1)
    denoise = (v.float() - v_target.float()).square().mean()       # mean over C, H, W and batch
    return {"loss": denoise + lam * align, "denoise": denoise, "align": align}


# ---------------------------------------------------------------------------------------------
# Samplers (t runs from 1, noise, to 0, data)
# ---------------------------------------------------------------------------------------------


def guided_velocity(model, x, t, y, cfg_scale=1.0, null_label=None):
    """v(x, t | y) with classifier-free guidance on ALL channels (DiT/SiT guide only 3 of 4, a bug):
    v = v_uncond + cfg_scale * (v_cond - v_uncond). The conditional and null-label halves run as one
    doubled batch (2N); at scale 1 only the conditional pass runs. x in the model's dtype, t a float."""
    t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if cfg_scale == 1.0:
        return model(x, t_vec, y)
    null_label = getattr(model, "module", model).config.num_classes if null_label is None else null_label
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]),
                             torch.cat([y, torch.full_like(y, null_label)])).chunk(2)   # 2N -> N, N
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def guidance_scale(t, cfg_scale, guidance_interval):
    """CFG only for t in [low, high] (REPA: high = 0.7, so the noisiest 30% of steps run unguided)."""
    return cfg_scale if guidance_interval[0] <= t <= guidance_interval[1] else 1.0


def state_dtype(device):
    """Sampler state precision: float64 (the papers' samplers), float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def sample_sde(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0),
               generator=None, t_last=0.04, path="linear"):
    """The papers' Euler-Maruyama sampler ("SDE, 250 steps"), t = 1 (noise) -> 0 (data).
    Grid linspace(1, t_last, num_steps) then 0; num_steps model calls; state in float64.
    Reverse SDE with diffusion sigma_t: dx = (v - sigma_t s) dt + sqrt(2 sigma_t) dW, dt < 0
    (SiT's "sigma" form; on the linear path sigma_t = t, as in REPA's sampler).
    Returns x_0 in noise.dtype. `generator` must live on noise.device. Pass an eval-mode model (an
    EMA copy is): in training mode SiT drops labels at random."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    times = torch.linspace(1.0, t_last, num_steps, dtype=torch.float64).tolist() + [0.0]
    state = state_dtype(noise.device)
    x = noise.to(state)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t                                            # < 0
        w = guidance_scale(t, cfg_scale, guidance_interval)
        v = guided_velocity(model, x.to(noise.dtype), t, y, w).to(state)
        t_vec = torch.full((x.shape[0],), t, dtype=state, device=x.device)
        s = score_from_velocity(v, x, t_vec, path)                 # score from velocity
        sigma_t = path_coefficients(torch.tensor(t), path)[1].item()
        drift = v - sigma_t * s                                    # d = v - sigma_t s (linear: v - t s)
        x = x + drift * dt
        if i < num_steps - 1:                                      # last step to 0: mean only, no noise
            xi = torch.randn(x.shape, generator=generator, dtype=state, device=x.device)
            x = x + math.sqrt(2 * sigma_t) * math.sqrt(-dt) * xi
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ode(model, noise, y, num_steps=50, method="heun", cfg_scale=1.0,
               guidance_interval=(0.0, 1.0)):
    """Probability-flow ODE dx/dt = v, t = 1 (noise) -> 0 (data) on linspace(1, 0, num_steps + 1).
    Euler: num_steps calls. Heun: 2 num_steps - 1 (no corrector on the last step). float64 state.
    Guidance is decided once per step, at its start t (as REPA), for both Heun evaluations."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose 'euler' or 'heun'")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    state = state_dtype(noise.device)
    velocity = lambda x, t, w: guided_velocity(model, x.to(noise.dtype), t, y, w).to(state)
    x = noise.to(state)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        w = guidance_scale(t, cfg_scale, guidance_interval)
        v = velocity(x, t, w)
        x_euler = x + v * (t_next - t)                             # Euler predictor
        if method == "heun" and i < num_steps - 1:
            x = x + 0.5 * (v + velocity(x_euler, t_next, w)) * (t_next - t)   # trapezoid corrector
        else:
            x = x_euler
    return x.to(noise.dtype)


# ---------------------------------------------------------------------------------------------
# Utilities: EMA, device and precision
# ---------------------------------------------------------------------------------------------


def create_ema(model):
    """EMA weights start as an exact copy (as in SiT/REPA) and are never trained directly."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, one fused multi-tensor op over all parameters."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def pick_device(name=None):
    """The device a script runs on: `name` if given, else cuda, then mps, then cpu."""
    if name is not None:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device, enabled=True):
    """bf16 autocast on CUDA and CPU (bf16 has fp32's range, so no GradScaler); off on MPS."""
    device = torch.device(device)
    if not enabled or device.type not in ("cuda", "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Benchmark: `python sra2.py --bench` (a script, not part of the library: nothing runs on import)
# ---------------------------------------------------------------------------------------------


def _timed(fn, device, warmup, iters):
    """Median seconds per call of fn() after warmup calls, synchronising the device around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_flops_per_image(config, sra):
    """Forward + backward FLOPs of one image, counted by torch's FlopCounterMode on a meta-device
    copy (no memory, no time; there SDPA runs as plain matmuls, so attention is counted too)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = SiT(config)
        projector = make_projector(model) if sra else None
        z = torch.randn(1, config.in_channels, config.input_size, config.input_size)
        y = torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            training_loss(model, z, y, projector)["loss"].backward()
    return counter.get_total_flops()


def _bench_train(name, batch, mode, sra, device, overrides, warmup, iters, official=None):
    """One row: images/s, peak memory and FLOP/s of a full training step (fwd, bwd, AdamW)."""
    torch.manual_seed(0)
    if official is None:
        model = create_sit(name, **overrides).to(device)
    else:                                          # official SiT models.py: same math, no SRA 2 tap
        config = SiTConfig(**{**PRESETS[name], **overrides})
        kwargs = {k: v for k, v in vars(config).items() if k not in ("align_depth", "learn_sigma")}
        model = official.SiT(**kwargs, learn_sigma=False).to(device)
        model.config = config
    projector = make_projector(model).to(device) if sra else None
    flops = _train_flops_per_image(model.config, sra)                # the official model: same math
    params = list(model.parameters()) + (list(projector.parameters()) if sra else [])
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
    cfg = model.config
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    eager_fn = lambda z, y, t, eps: training_loss(model, z, y, projector, t=t, eps=eps)
    loss_fn = torch.compile(eager_fn) if mode == "bf16+compile" else eager_fn

    def step():
        t, eps = torch.rand(batch, device=device), torch.randn_like(z)
        with autocast(device, enabled=mode != "fp32"):
            loss = loss_fn(z, y, t, eps)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = _timed(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    compile_err = float("nan")
    if loss_fn is not eager_fn:                                    # compiled vs eager, same inputs
        t, eps = torch.rand(batch, device=device), torch.randn_like(z)
        with torch.no_grad():                                      # far from the zero-output init
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        y_null = torch.full_like(y, cfg.num_classes)              # label dropout cannot change these
        with torch.no_grad(), autocast(device):
            a, b = loss_fn(z, y_null, t, eps), eager_fn(z, y_null, t, eps)
        compile_err = max(abs(a[k].item() - b[k].item()) / abs(b[k].item()) for k in ("denoise", "align") if b[k])
    return dict(compile_err=compile_err, model=name + (" (official)" if official else ""), batch=batch, mode=mode, sra2=sra,
                img_s=batch / seconds, ms=1e3 * seconds, peak_gib=peak,
                tflops=flops * batch / seconds / 1e12)


def _bench_sampler(name, batch, steps, compiled, device, overrides, iters):
    model = create_sit(name, **overrides).to(device).eval()
    cfg = model.config
    model = torch.compile(model) if compiled else model
    noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    run = lambda: sample_sde(model, noise, y, num_steps=steps)
    with autocast(device):
        seconds = _timed(run, device, warmup=1, iters=iters)
    return dict(model=name, batch=batch, steps=steps, compiled=compiled, img_s=batch / seconds, s=seconds)


def _matmul_ceiling(device, n):
    """TFLOP/s of one large bf16 (CPU: fp32) matmul: the practical ceiling for this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _timed(lambda: a @ b, device, warmup=3, iters=10) / 1e12


def benchmark(device, quick=False, official_path=None):
    """Training-step and sampler throughput. quick: tiny sizes for a CPU smoke run."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True                   # "fp32" means fp32/TF32, as SiT
    torch.backends.cudnn.allow_tf32 = True
    try:
        return _benchmark(device, quick, official_path)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _benchmark(device, quick, official_path):
    official = None
    if official_path:
        import importlib.util
        spec = importlib.util.spec_from_file_location("official_sit_models", official_path)
        official = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(official)
    if quick:                                                      # a 4-block S/2 on 8x8 latents
        overrides = dict(input_size=8, num_classes=10, depth=4, hidden_size=128, num_heads=2)
        warmup, iters = 1, 3
        cases = [("SiT-S/2", 8)]
        modes = ["fp32", "bf16"]
        sampler = ("SiT-S/2", 8, 10)
    else:                                                          # ImageNet 256: 32x32x4 latents
        overrides = dict(input_size=32, num_classes=1000)
        warmup, iters = 5, 10
        cases = [("SiT-B/2", 256), ("SiT-XL/2", 64)]
        modes = ["fp32", "bf16"] + (["bf16+compile"] if device.type == "cuda" else [])
        sampler = ("SiT-B/2", 256, 250)
    ceiling = _matmul_ceiling(device, 1024 if quick else 8192)
    rows = []
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, matmul ceiling {ceiling:.1f} TFLOP/s", flush=True)
    header = f"{'model':<20}{'batch':>6}  {'mode':<13}{'SRA 2':<7}{'img/s':>9}{'ms/step':>9}{'peak GiB':>10}{'TFLOP/s':>9}{'of ceil':>8}  (ceiling: a large matmul, bf16 on CUDA, fp32 on CPU)"
    if quick:
        print(f"quick mode: a smoke run, the models are shrunk to {overrides}")
    print(header)
    for name, batch in cases:
        variants = [(m, s, None) for m in modes for s in (False, True)]
        variants += [(m, False, official) for m in modes] if official else []
        for mode, sra, off in variants:
            r = _bench_train(name, batch, mode, sra, device, overrides, warmup, iters, off)
            rows.append(r)
            print(f"{r['model']:<20}{batch:>6}  {mode:<13}{'on' if sra else 'off':<7}{r['img_s']:>9.1f}"
                  f"{r['ms']:>9.1f}{r['peak_gib']:>10.2f}{r['tflops']:>9.1f}{r['tflops'] / ceiling:>8.0%}"
                  + (f"  compiled vs eager loss: {r['compile_err']:.1e} relative" if r["compile_err"] == r["compile_err"] else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name, batch, steps = sampler
    for compiled in [False] + ([True] if device.type == "cuda" else []):
        r = _bench_sampler(name, batch, steps, compiled, device, overrides, iters=1 if not quick else 2)
        rows.append(r)
        print(f"sampler {name} batch {batch}, {steps}-step Euler-Maruyama, bf16"
              f"{' + compile' if compiled else ''}: {r['img_s']:.1f} img/s ({r['s']:.2f} s per batch)", flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="sra2 is a library; this entry point only benchmarks it.")
    parser.add_argument("--bench", action="store_true", help="measure training and sampling throughput")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run in seconds")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--official", default=None, metavar="MODELS_PY",
                        help="also time the official SiT models.py (needs timm; never committed here)")
    args = parser.parse_args()
    if not args.bench:
        parser.error("nothing to do: pass --bench (the library itself is imported, not run)")
    benchmark(pick_device(args.device), quick=args.quick, official_path=args.official)
