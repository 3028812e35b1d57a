"""sra2.py: SiT + SRA 2 (VAE Self-Representation Alignment) in one readable file.

SRA 2 (CVPR 2026, "VAE Self-Representation Alignment for Efficient Diffusion Training") trains a
SiT (Ma et al. 2024: a DiT with an interpolant and a velocity loss on VAE latents) with one extra
branch: the tokens h of an early block go through a small MLP P and are pulled, with smooth-L1
(beta 0.05), toward f_VAE, the clean VAE latent z of the same image, laid out as tokens. The latent
is what the model denoises anyway, so the target costs nothing. At inference P is dropped and what
remains is a plain SiT. Start reading at `training_loss`; above it are SiT, the projector P and
the interpolant it uses, below it the samplers and small utilities (EMA, device, precision).

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
Bad input raises a ValueError that names it (`_require` lines: skip them on a first read).
"""
import argparse
import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _check_block(k, n_blocks, name="align depth"):                # h_k: output of block k
    _require(1 <= k <= n_blocks, f"{name} {k} is outside the model's blocks 1..{n_blocks}")


# ----------------------------------------------------------------------------------------------
# Config and presets

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
    learn_sigma: bool = False        # as SiT's released checkpoints: 2C outputs, C never trained
    align_depth: int = 8             # SRA 2: block whose output h is aligned (1-indexed)


# The paper aligns block 2 for S and B (12 blocks) and block 8 for L and XL (24, 28 blocks).
PRESETS = {f"SiT-{size}/{p}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=p,
                                   align_depth=2 if depth == 12 else 8)
           for size, (depth, width, heads) in {"S": (12, 384, 6), "B": (12, 768, 12),
                                               "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items()
           for p in (2, 4, 8)}


def create_sit(name, **overrides):
    """SiT from a paper name ("SiT-B/2") plus any SiTConfig field, e.g. input_size=16."""
    _require(name in PRESETS, f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(SiTConfig.__dataclass_fields__))
    _require(not unknown, f"unknown SiTConfig field(s): {', '.join(unknown)}")
    return SiT(SiTConfig(**{**PRESETS[name], **overrides}))


# ----------------------------------------------------------------------------------------------
# Embeddings

def sincos_2d(dim, grid_size):
    """(T, D) fixed position table as DiT/SiT, tokens row-major: [sin, cos](w omega) in the first
    half of the channels, [sin, cos](h omega) in the second, omega_k = 1 / 10000^(4k / D).
    In float64 on the CPU (MPS has none), then copied into the model's pos_embed."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = [pos.reshape(-1, 1).double() * omega for pos in (cols, rows)]   # 2 x (T, D/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)   # (T, D)


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
        # Made per call in float32, as SiT: a buffer would be rounded by .to(bfloat16) (and
        # left empty by meta-device loading). torch.compile folds this away.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]                  # (N, 128)
        emb = torch.cat([angles.cos(), angles.sin()], dim=1)        # cos first, as SiT
        return self.mlp(emb.to(self.mlp[0].weight.dtype))          # a float64 model runs as float64


class LabelEmbedder(nn.Module):
    """Class label -> (N, D). Row num_classes is the null label (present, as in DiT/SiT, only if
    class_dropout_prob > 0): in training labels become it at that rate, which makes CFG possible."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, drop=None):
        """drop (N,) bool: the labels to null (DiT's force_drop_ids); None: drawn in training."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
        if drop is not None:
            _require(self.embedding_table.num_embeddings > self.num_classes, "a label-dropout "
                     "mask was given, but the model has no null label (class_dropout_prob is 0)")
            _require(drop.shape == y.shape and drop.dtype == torch.bool, f"the label-dropout mask "
                     f"must be bool {tuple(y.shape)}, got {drop.dtype} {tuple(drop.shape)}")
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


# ----------------------------------------------------------------------------------------------
# Transformer block with adaLN-Zero

def modulate(x, shift, scale):
    """adaLN: x (N, T, D), shift and scale (N, D) from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, head dim D / heads, fused SDPA kernel."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)             # each (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)                # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))       # (N, T, heads, d) -> (N, T, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)

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
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)    # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# Patch layout: the token order shared by the model output and the alignment target f_VAE

def patchify(x, p):
    """(N, C, H, W) -> (N, T, p*p*C), tokens row-major, each a patch in (p, q, c) order (c fastest).
    Exactly the inverse of `unpatchify`, so f_VAE tokens line up with the model's output tokens."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p)                      # (N, C, h, p, w, q)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)  # (N, T, pqC)


def unpatchify(tokens, p, H, W):
    """(N, T, p*p*C) -> (N, C, H, W), the layout of SiT's final layer."""
    N, T, _ = tokens.shape
    x = tokens.reshape(N, H // p, W // p, p, p, -1)                # (N, h, w, p, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                                 # (N, C, h, p, w, q)
    return x.reshape(N, -1, H, W)                                   # (N, C, H, W)


# ----------------------------------------------------------------------------------------------
# SiT

class SiT(nn.Module):
    """SiT with the official parameter names: SiT and REPA checkpoints load with strict=True.
    model(x_t, t, y) -> velocity v (N, C, H, W); t = 0 data, t = 1 noise."""
    def __init__(self, config: SiTConfig):
        super().__init__()
        cfg = self.config = config
        _require(cfg.input_size % cfg.patch_size == 0,
                 f"input_size {cfg.input_size} is not divisible by patch {cfg.patch_size}")
        _require(cfg.hidden_size % cfg.num_heads == 0 == cfg.hidden_size % 4,
                 f"hidden_size {cfg.hidden_size} must divide by num_heads and by 4")
        _check_block(cfg.align_depth, cfg.depth, "align_depth")
        D, grid = cfg.hidden_size, cfg.input_size // cfg.patch_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # Frozen, but a Parameter (not a buffer) so that the checkpoint keys match SiT's.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, D), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The official initialisation. Zeroed adaLN and final layers: the output is exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        cfg = self.config
        self.pos_embed.copy_(sincos_2d(cfg.hidden_size, cfg.input_size // cfg.patch_size))
        w = self.x_embedder.proj.weight                            # init the conv like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))            # on its (D, C*p*p) view
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in [*(block.adaLN_modulation for block in self.blocks), self.final_layer]:
            for param in module.parameters():                      # adaLN-Zero
                nn.init.zeros_(param)

    def forward(self, x_t, t, y, drop_labels=None):
        """x_t (N, C, H, W), t (N,) in [0, 1] (0 = data), y (N,) labels -> v (N, C, H, W).
        drop_labels: see LabelEmbedder. SRA 2 reads block k's output with `tap`, from outside."""
        t = self.check_inputs(x_t, t, y)
        x = self.x_embedder(x_t) + self.pos_embed                  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, drop_labels)   # (N, D) conditioning
        for block in self.blocks:
            x = block(x, c)                                        # (N, T, D)
        v = unpatchify(self.final_layer(x, c), self.config.patch_size, *x_t.shape[2:])
        return v[:, :self.config.in_channels]                      # learn_sigma: drop the unused C

    def check_inputs(self, x_t, t, y):
        """t as (N,). Shapes are checked always; values with one host sync (a bad label on CUDA
        is otherwise an opaque device assert), skipped inside torch.compile."""
        C, S, p = self.config.in_channels, self.config.input_size, self.config.patch_size
        shape, n_labels = tuple(x_t.shape), self.y_embedder.embedding_table.num_embeddings
        _require(len(shape) == 4 and shape[1] == C, f"x_t must be (N, {C}, H, W), got {shape}")
        _require(shape[2] % p == shape[3] % p == 0, f"x_t {shape[2:]} not divisible by patch {p}")
        _require(shape[2:] == (S, S), f"x_t is {shape[2:]}, the model was built for input_size {S}")
        t = t.expand(shape[0]) if t.ndim == 0 else t
        _require(t.shape == y.shape == shape[:1],
                 f"t and y must be (N,) = {shape[:1]}, got {tuple(t.shape)} and {tuple(y.shape)}")
        _require(not y.dtype.is_floating_point and y.dtype != torch.bool,
                 f"labels y must be integers, got {y.dtype}")
        if not (torch.compiler.is_compiling() or x_t.is_meta):     # meta: shapes only, no values
            bad_y, bad_t, bad_x = torch.stack([(y < 0).any() | (y >= n_labels).any(),
                                               ~((t >= 0) & (t <= 1)).all(),   # NaN fails both
                                               ~torch.isfinite(x_t).all()]).tolist()   # one sync
            null = "" if n_labels > self.config.num_classes else ", absent: class_dropout_prob is 0"
            _require(not bad_y, f"labels must be in [0, {n_labels - 1}] "
                     f"({self.config.num_classes} = null label{null})")
            _require(not bad_t, "t must be finite and in [0, 1] (t = 0 data, t = 1 noise)")
            _require(not bad_x, "x_t contains NaN or Inf")
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
    """Load a SiT or REPA checkpoint (path or dict; its "ema", else "model", else itself) with
    strict=True. REPA's `projectors.*` are returned, not loaded. Time direction: see SiTTimeFlip."""
    if not isinstance(checkpoint, dict):                           # REPA's files hold argparse args
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint.get("ema", checkpoint.get("model", checkpoint))
    projector_state = {k: v for k, v in state.items() if k.startswith("projectors.")}
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    rows = state.get("final_layer.linear.weight", torch.empty(0)).shape[0]
    ours = model.final_layer.linear.weight.shape[0]
    _require(rows in (0, ours), f"checkpoint predicts {rows} values per token, the model {ours}: "
             f"set learn_sigma={rows == 2 * ours}")
    model.load_state_dict(state, strict=True)
    return projector_state


# ----------------------------------------------------------------------------------------------
# SRA 2: the tap on block k and the projector P

def _inner(model):
    """The model itself, inside DistributedDataParallel (.module) or torch.compile (._orig_mod)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextmanager
def tap(model, depths):
    """Capture h (N, T, D) after block k (1-indexed) for each k in `depths` with forward hooks on
    model.blocks (any SiT/DiT-like model, also in DDP or torch.compile), removed on leaving:
        with tap(model, [2]) as hidden:
            v = model(x_t, t, y)
        h = hidden[2]     # a block called twice in one forward leaves its last output"""
    blocks = getattr(_inner(model), "blocks", None)
    _require(isinstance(blocks, nn.ModuleList),
             f"{type(_inner(model)).__name__} has no `blocks` ModuleList to tap")
    for k in depths:
        _check_block(k, len(blocks))
    hidden = {}
    keep = lambda k: (lambda module, args, out: hidden.__setitem__(k, out))   # h_k (N, T, D)
    handles = [blocks[k - 1].register_forward_hook(keep(k)) for k in sorted(set(depths))]
    try:
        yield hidden
    finally:
        for handle in handles:
            handle.remove()


class Projector(nn.Module):
    """Token-wise MLP P: (N, T, D) -> (N, T, out_dim), `depth` Linears with SiLU between, REPA's
    init. A separate module: the SiT state dict stays plain and P is dropped after training."""
    def __init__(self, in_dim, out_dim, depth=5, width=None):
        super().__init__()
        _require(depth >= 1, f"projector depth must be >= 1, got {depth}")
        dims = [in_dim] + [width or 2 * in_dim] * (depth - 1) + [out_dim]
        layers = [layer for d_in, d_out in zip(dims, dims[1:])
                  for layer in (nn.Linear(d_in, d_out), nn.SiLU())]
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


@dataclass
class Alignment:
    """One alignment term: weight * loss(P(h_k), target), h_k the tokens after block `depth`.
    target None: f_VAE, the clean latent z as tokens (SRA 2); else (N, T, d) features of this
    batch from any encoder (REPA: DINOv2, with loss="cosine", weight 0.5 and block 8)."""
    name: str
    depth: int
    projector: nn.Module
    target: torch.Tensor = None
    loss: str = "smooth_l1"
    weight: float = 1.0
    t_range: tuple = (0.0, 1.0)     # align only the samples with t in [lo, hi]


# ----------------------------------------------------------------------------------------------
# Interpolant and losses

PATHS = ("linear", "cosine")
ALIGN_LOSSES = ("smooth_l1", "cosine", "l1", "l2")


def path_coefficients(t, path="linear"):
    """x_t = alpha_t z + sigma_t eps (t = 0 data). Returns alpha, sigma, d alpha/dt, d sigma/dt."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    _require(path == "cosine", f"unknown path {path!r}; choose one of {PATHS}")
    a = t * (math.pi / 2)                                          # the GVP path of SiT
    return a.cos(), a.sin(), -(math.pi / 2) * a.sin(), (math.pi / 2) * a.cos()


def interpolate(z, eps, t, path="linear"):
    """x_t and the velocity target v = d x_t / dt (linear: (1 - t) z + t eps and eps - z)."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t.reshape(-1, *[1] * (z.ndim - 1)), path)
    return alpha * z + sigma * eps, d_alpha * z + d_sigma * eps


def score_from_velocity(v, x_t, t, path="linear"):
    """s = grad log p_t(x_t) = -eps_hat / sigma_t, with eps_hat solved from x_t and v.
    Linear path (t = 0 data): s = -((1 - t) v + x_t) / t."""
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t.reshape(-1, *[1] * (x_t.ndim - 1)), path)
    eps_hat = (alpha * v - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)
    return -eps_hat / sigma


def alignment_loss(f_sit, f_vae, kind="smooth_l1", beta=0.05):
    """Per-sample alignment loss (N,) between P(h) = f_sit and the target f_vae, both (N, T, d).
    smooth-L1 per element: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = f_sit - f_vae;
    averaged over T and d. cosine: 1 - cos(f_sit, f_vae) per token, averaged over T."""
    _require(f_sit.shape == f_vae.shape,
             f"projector output {tuple(f_sit.shape)} and target {tuple(f_vae.shape)} differ")
    _require(kind in ALIGN_LOSSES, f"unknown alignment loss {kind!r}; choose one of {ALIGN_LOSSES}")
    dtype = torch.promote_types(f_sit.dtype, torch.float32)        # float32 at least (autocast)
    f_sit, f_vae = f_sit.to(dtype), f_vae.to(dtype)
    if kind == "cosine":
        per_element = 1 - F.cosine_similarity(f_sit, f_vae, dim=-1)   # (N, T)
    elif kind == "smooth_l1":
        per_element = F.smooth_l1_loss(f_sit, f_vae, beta=beta, reduction="none")   # (N, T, d)
    else:
        per_element = (f_sit - f_vae).abs() if kind == "l1" else (f_sit - f_vae).square()
    return per_element.flatten(1).mean(1)


def training_loss(model, z, y, projector=None, *, lam=1.0, align_depth=None,
                  align_loss="smooth_l1", t_range=(0.0, 1.0), target=None, alignments=(),
                  path="linear", t=None, eps=None, drop_labels=None):
    """The SRA 2 objective L = L_denoise + lam * L_align from one forward pass at one t (t = 0 is
    data). Returns {"loss", "denoise", "align", and each extra alignment's name}.
    z (N, C, H, W) clean latents, y (N,) labels. model: sra2's SiT or any model(x_t, t, y) with
    `model.blocks` (then pass align_depth) returning v, or a tuple whose first item is v (REPA's
    SiT returns (v, zs)). projector P: the term "align", P(h_k) pulled toward
    f_VAE = z as tokens (or `target` (N, T, d)); None: a plain SiT. alignments: more terms, e.g.
    REPA's; a t_range averages a term over the samples with t inside it. t, eps and drop_labels
    default to global-RNG draws (pass them in tests, or a rank's share of one global draw)."""
    inner = _inner(model)
    if projector is not None:
        depth = align_depth or getattr(getattr(inner, "config", None), "align_depth", None)
        _require(depth is not None,
                 f"align_depth is needed: {type(inner).__name__} has no config.align_depth")
        alignments = [Alignment("align", depth, projector, target, align_loss, lam, t_range),
                      *alignments]
    names = [a.name for a in alignments]
    _require(len(set(names)) == len(names) and not {"loss", "denoise"} & set(names),
             f"alignment names must be distinct, not 'loss' or 'denoise': {names}")
    t_dtype = torch.promote_types(z.dtype, torch.float32)          # never bf16 times
    t = torch.rand(z.shape[0], device=z.device, dtype=t_dtype) if t is None else t
    eps = torch.randn_like(z) if eps is None else eps
    x_t, v_target = interpolate(z, eps, t, path)                   # (1-t) z + t eps, eps - z
    drop = {} if drop_labels is None else dict(drop_labels=drop_labels)   # only when given
    with tap(model, [a.depth for a in alignments]) if alignments else nullcontext({}) as hidden:
        v = model(x_t, t, y, **drop)                               # hidden[k]: h_k (N, T, D)
    v = v[0] if isinstance(v, (tuple, list)) else v                # REPA's SiT: (v, zs)
    denoise = (v.float() - v_target.float()).square().mean()       # mean over C, H, W and batch
    parts = {"loss": denoise, "denoise": denoise, "align": denoise.new_zeros(())}
    for a in alignments:
        f_sit = a.projector(hidden[a.depth])                       # P(h) (N, T, d)
        f_vae = patchify(z, _patch_size(inner)) if a.target is None else a.target   # (N, T, d)
        per_sample = alignment_loss(f_sit, f_vae, a.loss)          # (N,)
        in_range = ((t >= a.t_range[0]) & (t <= a.t_range[1])).float()
        parts[a.name] = (per_sample * in_range).sum() / in_range.sum().clamp(min=1)
        parts["loss"] = parts["loss"] + a.weight * parts[a.name]
    return parts


def _patch_size(model):
    """p of sra2's SiT (config.patch_size) or of DiT/SiT/REPA's code (patch_size, int or pair)."""
    p = getattr(getattr(model, "config", None), "patch_size", None)
    p = p or getattr(model, "patch_size", None)
    _require(p is not None, f"{type(model).__name__} has no patch_size; pass the target as tokens")
    return p if isinstance(p, int) else p[0]


# ----------------------------------------------------------------------------------------------
# Samplers (t runs from 1, noise, to 0, data)

def guided_velocity(model, x, t, y, cfg_scale=1.0, dtype=None, null_label=None):
    """v = v_uncond + w (v_cond - v_uncond), classifier-free guidance w = cfg_scale on all C
    channels (DiT and SiT guide only 3 of 4, a choice their released numbers depend on), mixed in
    x's dtype, the model run in `dtype`. w = 1: one conditional pass; w = 0: unconditional."""
    dtype = dtype or x.dtype
    t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
    if cfg_scale == 1.0:
        return model(x.to(dtype), t_vec, y).to(x.dtype)
    null_label = _inner(model).config.num_classes if null_label is None else null_label
    # The conditional and null-label halves as one doubled batch: (2N, C, H, W) -> 2 x (N, C, H, W)
    v_cond, v_uncond = model(torch.cat([x, x]).to(dtype), torch.cat([t_vec, t_vec]),
                             torch.cat([y, torch.full_like(y, null_label)])).to(x.dtype).chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def guidance_scale(t, cfg_scale, guidance_interval):
    """CFG only for t in [low, high] (REPA: high = 0.7: the noisiest 30% of steps unguided)."""
    _require(cfg_scale >= 0, f"cfg_scale must be >= 0, got {cfg_scale}")
    return cfg_scale if guidance_interval[0] <= t <= guidance_interval[1] else 1.0


@torch.no_grad()
def sample_sde(model, noise, y, num_steps=250, cfg_scale=1.0, guidance_interval=(0.0, 1.0),
               generator=None, t_last=0.04, path="linear"):
    """The papers' Euler-Maruyama sampler ("SDE, 250 steps"), t = 1 (noise) -> 0 (data), on
    linspace(1, t_last, num_steps) then 0, state in float64. Reverse SDE with diffusion sigma_t
    (SiT's "sigma" form; sigma_t = t on the linear path, as REPA): dx = (v - sigma_t s) dt +
    sqrt(2 sigma_t) dW, dt < 0. Pass an eval-mode model (in training SiT drops labels)."""
    _require(num_steps >= 1, f"num_steps must be >= 1, got {num_steps}")
    times = torch.linspace(1.0, t_last, num_steps, dtype=torch.float64).tolist() + [0.0]
    state = torch.float32 if noise.device.type == "mps" else torch.float64   # MPS has no float64
    x = noise.to(state)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t                                            # < 0
        w = guidance_scale(t, cfg_scale, guidance_interval)
        v = guided_velocity(model, x, t, y, w, dtype=noise.dtype)  # in the state's dtype
        t_vec = torch.full((x.shape[0],), t, dtype=state, device=x.device)
        s = score_from_velocity(v, x, t_vec, path)                 # score from velocity
        sigma_t = path_coefficients(t_vec[:1], path)[1].item()      # t in float64, not rounded
        # Why v - sigma_t s: by Fokker-Planck, run from t = 1 to 0, dx = (v - sigma_t s) dt +
        # sqrt(2 sigma_t) dW has the marginals p_t of the ODE dx = v dt for any sigma_t >= 0.
        drift = v - sigma_t * s                                    # linear path: v - t s
        x = x + drift * dt
        if i < num_steps - 1:                                      # last step: mean only, no noise
            xi = torch.randn(x.shape, generator=generator, dtype=state, device=x.device)
            x = x + math.sqrt(2 * sigma_t) * math.sqrt(-dt) * xi
    return x.to(noise.dtype)


@torch.no_grad()
def sample_ode(model, noise, y, num_steps=50, method="heun", cfg_scale=1.0,
               guidance_interval=(0.0, 1.0)):
    """Probability-flow ODE dx/dt = v, t = 1 (noise) -> 0 (data) on linspace(1, 0, num_steps + 1).
    Heun: 2 num_steps - 1 calls (no corrector on the last step), guided as at the step's start."""
    _require(method in ("euler", "heun"), f"unknown ODE method {method!r}: euler or heun")
    _require(num_steps >= 1, f"num_steps must be >= 1, got {num_steps}")
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    velocity = lambda x, t, w: guided_velocity(model, x, t, y, w, dtype=noise.dtype)
    x = noise.to(torch.float32 if noise.device.type == "mps" else torch.float64)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        w = guidance_scale(t, cfg_scale, guidance_interval)
        v = velocity(x, t, w)
        x_euler = x + v * (t_next - t)                             # Euler predictor
        if method == "heun" and i < num_steps - 1:
            x = x + 0.5 * (v + velocity(x_euler, t_next, w)) * (t_next - t)   # trapezoid corrector
        else:
            x = x_euler
    return x.to(noise.dtype)


# ----------------------------------------------------------------------------------------------
# Utilities: EMA, device and precision

def create_ema(model):
    """EMA weights start as an exact copy (as in SiT/REPA) and are never trained directly."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema, model, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, one fused multi-tensor op over all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def pick_device(name=None):
    """The device a script runs on: `name` if given, else cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name is None:
        return torch.device(next((kind for kind, ok in available.items() if ok), "cpu"))
    device = torch.device(name)
    _require(available.get(device.type, True), f"device {name!r} requested but "
             f"{device.type.upper()} is not available")
    return device


def default_precision(device):
    """"bf16" where bf16 autocast is fast (CUDA; a CPU with native bf16: AVX512-BF16 or AMX),
    else "fp32" (elsewhere a CPU emulates bf16, slower than fp32)."""
    device, cpu = torch.device(device), getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in
                 ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and native) else "fp32"


def autocast(device, enabled=True):
    """bf16 autocast on CUDA and CPU (bf16 has fp32's range, so no GradScaler); off on MPS."""
    device = torch.device(device)
    on = enabled and device.type in ("cuda", "cpu")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()
