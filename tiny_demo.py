#!/usr/bin/env python3
"""tiny_demo.py: does SRA 2 make a diffusion transformer converge faster? CIFAR-10 on one GPU.

    python tiny_demo.py                  # the demo on one GPU (--help lists every knob)
    python tiny_demo.py --preset cpu     # the same question on two CPU cores (smaller SiT, two
                                         # seeds: about 40 min on two free cores with native bf16)
    python tiny_demo.py --quick          # CPU smoke test of the whole pipeline (synthetic data,
                                         # about a minute on two busy cores)
    python tiny_demo.py --ablate         # Table 1 of the paper in miniature
    python tiny_demo.py ... --resume     # after a crash or a kill: the same flags, plus --resume
    torchrun --nproc_per_node=N tiny_demo.py   # N GPUs (DDP): the same run, the batch split N ways

Stage 1 trains a small VAE (32x32x3 -> 16x16x4) once, or takes a pretrained one (--vae taef2:
TAEF2, 8x8x32), and caches the latents: f_VAE exists before stage 2, the paper's premise. Stage 2
trains SiT twice on the same draws: the baseline, and SRA 2
(projector P on block align_depth pulled toward the clean latent z). Then the held-out loss, FID,
tables and pictures. sra2.py's conventions: t = 0 data, x_t = (1 - t) z + t eps, v = eps - z. Step
k's batch, t, eps and dropped labels are functions of (seed, k): both runs see them, a resumed run
ends bit for bit where an uninterrupted one ends (on a CPU), torchrun's ranks share one draw.
FID-2k is biased upward against FID-50k (and FID-250 more so): compare each only with itself.
demo_infra.py holds what runs around the experiment: checkpoints, torchrun, data files, drawing.
"""
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import fid
import sra2
from demo_infra import (TAEF2, TAEF2_ENV, TAEF2_SHA256, DemoError, FIDMeter, Interrupted,
                        catch_ctrl_c, check_checkpoints, ckpt_path, data_parallel, digest,
                        download_cifar, estimate, fail, fmt, from_rank0, gather_chunks, line_chart,
                        load_inception, load_taef2, machine, mean_record, panels, rank0_first,
                        rank_and_world, read_cache, read_cifar, reference_path, resume,
                        save_checkpoint, say, setup, synced_clock, synthetic_images, table,
                        teardown, torchrun_world)
from fid import OneLineParser, Progress, atomic_write, fmt_time

# ============================================ Settings ============================================

VAE_SEED = 0             # one VAE for every --seed: stage 1 is given, as the SD-VAE is in the paper
HELDOUT_T = 12           # the held-out set's t grid: (j + 0.5) / 12, image i at grid point i % 12
HELDOUT_SEED = 20_260    # its noise: one fixed draw, the same for every run, seed and checkpoint
HELDOUT_BANDS = {"low": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "high": (2 / 3, 1)}   # t in [lo, hi)
# SiTs beyond the paper's presets, for CPU runs: (preset, overrides). Head dim 64 as in SiT.
DEMO_MODELS = {"tiny": ("SiT-S/2", dict(depth=4, hidden_size=128, num_heads=2)),
               "small": ("SiT-S/2", dict(depth=8, hidden_size=128, num_heads=2))}
# The depth sweep, "<blocks>x<width>": two widths, 24x64 and 6x128 (12x64 and 3x128) about equal
# in FLOPs per step. Aligned block: the paper's fraction, 1/6 up to 12 blocks (2 of 12, for S
# and B) and 1/3 from 24 on (8 of 24, for L); at least block 1.
DEMO_MODELS.update({f"{d}x{w}": ("SiT-S/2", dict(depth=d, hidden_size=w, num_heads=w // 64,
                                                 align_depth=max(1, d // 6 if d <= 12 else d // 3)))
                    for d, w in [(6, 64), (12, 64), (24, 64), (3, 128), (6, 128), (12, 128)]})
PRESETS = ("full", "cpu", "quick")
PRESET_HELP = ("full (default): one GPU, not yet timed (a CPU prints its estimate first: about "
               "240h on two cores); cpu: two seeds, each a baseline + SRA 2 pair, about 40 min "
               "on two free cores with native bf16 (longer in fp32); quick: a smoke test on "
               "synthetic data, 63 s on two busy cores")
# Every knob, a flag each (--batch-size): [full, cpu, quick] or one value for all; a flag wins.
# full: SiT-S/2, the paper's smallest /2 model (its lr 1e-4 is for 400K steps; this run is short);
# cpu: two CPU cores (README, Results); quick: all stages in about a minute, on one thread (small
# ops), its FIDs of 4 images (cheap with fid.frechet_distance's factors; the Inception passes cost).
KNOBS = {
    "model": (["SiT-S/2", "small", "tiny"], "SiT preset, or tiny (4 blocks, D 128), small (8), "
              "or BLOCKSxWIDTH of the depth sweep (24x64)"),
    "precision": ("auto", "bf16 autocast, fp32, or auto: bf16 on CUDA and on CPUs with native "
                  "bf16, else fp32"),
    "steps": ([4000, 1200, 20], "training steps per run"),
    "batch_size": ([256, 64, 16], "global batch"),
    "lr": ([3e-4, 3e-4, 1e-3], "AdamW learning rate, the same for both runs"),
    "n_images": ([None, 10000, 256], "use the first N training images (None: all)"),
    "seed": (["0", "0,1", "0"], "one seed, or several comma-separated"),
    "runs": ("baseline,sra2", "which runs to train: baseline,sra2, baseline or sra2"),
    "threads": ([None, 2, 1], "CPU threads (None: torch's)"),
    "log_every": ([50, 25, 5], "steps per log line"),
    "grad_clip": (1.0, "gradient norm clip"),
    "clip": ("joint", "clip SiT and P as one vector (REPA), each on its own, or not"),
    "ema_decay": (0.9999, "cap of the EMA warm-up"),
    "align_depth": (None, "aligned block, 1-indexed (None: the model's)"),
    "align_loss": ("smooth_l1", "the alignment loss"),
    "lam": (1.0, "weight of the alignment loss"),
    "t_range": ((0.0, 1.0), "align only where t in [LO, HI], t = 0 data"),
    "mlp_depth": (5, "projector layers"),
    "mlp_width": (None, "projector width (None: 2D)"),
    "target": ("mean", "SRA 2 target: the posterior mean, a fresh posterior sample each step, "
               "or (a control) another image's mean: the latents' statistics, not this image's"),
    "target_scale": (1.0, "SRA 2 target = this x the latent"),
    "vae": ("own", "stage 1: our small VAE trained on the data, or TAEF2, pretrained (FLUX.2's "
            "latents; the images bicubic-upsampled to 64 px, decoded back by 2x2 means)"),
    "vae_width": ([64, 32, 16], "VAE channels at 32x32"),
    "latent_channels": (4, "VAE latent channels"),
    "vae_steps": ([3000, 400, 20], "VAE training steps"),
    "vae_batch": ([256, 64, 16], "VAE batch"),
    "vae_lr": (3e-4, "VAE learning rate"),
    "vae_kl": (1e-5, "KL weight per latent element"),
    "heldout_n": ([2000, 1000, 12], "test images in the held-out set"),
    "heldout_evals": ([10, 8, 2], "held-out loss checkpoints, 0 = none"),
    "evals": ([5, 3, 2], "FID checkpoints per run, 0 = none (--ablate: 1)"),
    "fid_n": ([2000, 250, 4], "images per checkpoint FID"),
    "fid_sampling_steps": ([50, 25, 10], "SDE steps for the checkpoint FIDs"),
    "final_fid_n": ([5000, 0, 4], "images for the final FID, 0 = none"),
    "final_sampling_steps": ([250, 50, 20], "SDE steps for the final FID"),
    "fid_ref_n": ([50000, 1000, 8], "training images in the FID reference"),
    "sample_batch": ([1000, 250, 64], "images per sampler batch"),
    "ckpt_minutes": (3.0, "checkpoint period, 0 = never"),
    "ckpt_every": (0, "also a checkpoint every N steps, 0 = never")}
CHOICES = {"model": [*sra2.PRESETS, *DEMO_MODELS], "clip": ["joint", "separate", "none"],
           "align_loss": sra2.ALIGN_LOSSES, "target": ["mean", "sample", "other"],
           "precision": ["auto", "bf16", "fp32"], "vae": ["own", "taef2"],
           "runs": ["baseline,sra2", "baseline", "sra2", "sra2,baseline"]}

def parse_args(argv=None):
    """The settings: the preset's knobs, and the flags given over them."""
    parser = OneLineParser(prog="tiny_demo", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--preset", choices=PRESETS, help=PRESET_HELP)
    add("--quick", action="store_true", help="the same as --preset quick")
    add("--ablate", action="store_true", help="Table 1 in miniature: one run per design choice")
    add("--resume", action="store_true", help="continue each run from --out/ckpt/<run>.pt")
    add("--compile", action="store_true", help="torch.compile the SiT (pays on long CUDA runs)")
    add("--out", default="demo_out", help="table, PNGs, log, results.json, ckpt/ (%(default)s)")
    add("--data", help="cifar-10-batches-py folder, its .tar.gz, or 'synthetic' (default: "
        "download into --cache; --quick: synthetic)")
    add("--cache", default=os.environ.get("SRA2_CACHE", str(Path.home() / ".cache" / "sra2")),
        help="download, stage-1 and FID-reference cache (%(default)s; env SRA2_CACHE)")
    add("--inception", default=os.environ.get(fid.WEIGHTS_ENV),
        help=f"FID Inception weights .pth (default: env {fid.WEIGHTS_ENV}, else fid.py's)")
    add("--taef2", metavar="DIR", default=os.environ.get(TAEF2_ENV), help="folder of TAEF2's "
        f"taef2_encoder.pth, _decoder.pth (default: env {TAEF2_ENV}, else downloaded to --cache)")
    add("--device", help="cuda, mps or cpu (default: cuda, then mps, then cpu)")
    for key, (values, text) in KNOBS.items():                 # default None: the preset's value
        values = values if isinstance(values, list) else [values] * 3
        pair = isinstance(values[0], tuple)                   # --t-range LO HI
        shown = "%g %g" % values[0] if pair else values[0] if len(set(map(str, values))) == 1 \
            else "; ".join(map("{} {}".format, PRESETS, values))
        add("--" + key.replace("_", "-"), choices=CHOICES.get(key), help=f"{text} ({shown})",
            type=float if pair else type(next((v for v in values if v is not None), 0)),
            nargs=2 if pair else None, metavar=("LO", "HI") if pair else {
                "model": "NAME", "runs": "RUNS"}.get(key))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick is --preset quick: it conflicts with --preset {args.preset}")
    args.preset = "quick" if args.quick else args.preset or "full"
    args.quick, preset = args.preset == "quick", PRESETS.index(args.preset)
    args.data = "synthetic" if args.quick and args.data is None else args.data
    args.evals = 1 if args.ablate and args.evals is None else args.evals   # Table 1: the end only
    for key, (values, _) in KNOBS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[preset] if isinstance(values, list) else values)
    return args

def describe(args):
    """The settings that make the run what it is, in one line (printed first)."""
    fids = f"{args.ckpt_fid} at {args.evals} checkpoints" if args.evals else "no FID checkpoints"
    fids += f", {args.final_fid} at the end" if args.final_fid_n else ""
    heldout = (f"held-out loss on {args.heldout_n} test images at {args.heldout_evals} checkpoints"
               if args.heldout_evals else "no held-out loss")
    return (f"preset {args.preset}: {args.model}, {args.steps} steps of batch {args.batch_size}, "
            f"lr {args.lr:g}, {args.clip} clip {args.grad_clip:g}, {args.precision}, "
            f"seeds {args.seeds}, "
            f"{', '.join(args.runs)}; {heldout}; {fids}")

# What each flag must be, in order: (flags, ok(value, args), need). A bad value gets one line,
# "--flag must be <need>, got <value>" (or `need`, where it names the flag); None passes.
FLAG_RULES = [
    ("lr grad_clip ema_decay target_scale lam t_range ckpt_minutes vae_lr vae_kl",
     lambda v, a: np.isfinite(v).all(), "a finite number"),
    ("seed", lambda v, a: all(k.isdecimal() and int(k) < 2**31 for k in v.split(",")) and len(
        set(map(int, v.split(",")))) == v.count(",") + 1, "{flag} {v!r}: need distinct integers "
     "in 0..2147483647, comma-separated"),
    ("steps batch_size threads n_images vae_steps vae_batch vae_width sample_batch mlp_depth "
     "mlp_width log_every latent_channels fid_sampling_steps final_sampling_steps",
     lambda v, a: v >= 1, ">= 1"),
    ("evals heldout_evals ckpt_every ckpt_minutes vae_kl lam", lambda v, a: v >= 0, ">= 0"),
    ("lr grad_clip target_scale vae_lr", lambda v, a: v > 0, "> 0"),
    ("fid_n fid_ref_n", lambda v, a: v >= 2, ">= 2 (FID needs a covariance)"),
    ("final_fid_n", lambda v, a: v == 0 or v >= 2, ">= 2 (FID needs a covariance), or 0 for none"),
    ("heldout_n", lambda v, a: v >= HELDOUT_T or not a.heldout_evals,
     f">= {HELDOUT_T} (one image per point of the t grid)"),
    ("ema_decay", lambda v, a: 0 <= v < 1, "in [0, 1)"),
    ("t_range", lambda v, a: 0 <= v[0] < v[1] <= 1,
     "LO HI with 0 <= LO < HI <= 1 (t = 0 data, t = 1 noise)"),
    ("batch_size", lambda v, a: v % torchrun_world() == 0, "{flag} {v} does not split evenly over "
     "{world} processes (the global batch is shared out across torchrun's ranks)"),
    ("vae_width", lambda v, a: v % 8 == 0, "a multiple of 8 (GroupNorm groups)"),
    ("steps", lambda v, a: max(a.evals, a.heldout_evals) <= v,
     "--evals {a.evals} / --heldout-evals {a.heldout_evals}: more than --steps {v}"),
    ("target", lambda v, a: v != "sample" or a.vae == "own", "--target sample needs --vae own "
     "(TAEF2's encoder is deterministic: there is no posterior to sample)"),
    ("target", lambda v, a: v != "other" or a.batch_size >= 2, "--target other needs --batch-size "
     ">= 2 (the control pulls each image toward another image's latent)"),
    ("align_depth", lambda v, a: 1 <= v <= model_config(a).depth,
     "{flag} {v} is beyond {a.model}'s {depth} blocks (choose 1..{depth})")]

def check(args):
    """Every impossible setting as one line (FLAG_RULES), before any work; then the derived ones."""
    config = model_config(args)
    args.align_depth = config.align_depth if args.align_depth is None else args.align_depth
    for names, ok, need in FLAG_RULES:
        for name in names.split():
            value = getattr(args, name)
            if value is None or ok(value, args):
                continue
            shown = value if isinstance(value, str) else " ".join(
                f"{x:g}" for x in np.atleast_1d(value))
            line = need if "{flag}" in need or "--" in need else "{flag} must be " + need + \
                ", got {v}"
            raise DemoError(line.format(flag="--" + name.replace("_", "-"), v=shown, a=args,
                                        world=torchrun_world(), depth=config.depth))
    args.seeds = [int(seed) for seed in args.seed.split(",")]
    args.seed, args.runs = args.seeds[0], args.runs.split(",")
    fid_name = lambda n: f"FID-{n // 1000}k" if n % 1000 == 0 else f"FID-{n}"   # FID-2k, FID-250
    args.ckpt_fid = f"{fid_name(args.fid_n)} {args.fid_sampling_steps}-step"
    args.final_fid = f"{fid_name(args.final_fid_n)} {args.final_sampling_steps}-step"

# ========= Data: CIFAR-10 or synthetic class shapes (demo_infra downloads, reads, draws) ==========

def load_data(args, split="train"):
    """(images uint8 (n, 32, 32, 3), labels (n,), description): the first --n-images training
    images, or the first --heldout-n test images (never trained on)."""
    n = args.n_images if split == "train" else args.heldout_n
    if args.data == "synthetic":                          # the test split has a seed of its own
        images, labels = synthetic_images(n or 50000, args.seed if split == "train" else 1_000_003)
        return images, labels, f"SYNTHETIC shapes ({len(labels)} images; not CIFAR-10, numbers " \
            "not meaningful)"
    source = Path(args.data) if args.data else download_cifar(args.cache)
    images, labels = read_cifar(source, split)
    if split == "test" and len(images) < n:
        raise DemoError(f"--heldout-n {n}: the test split has {len(images)} images")
    return images[:n], labels[:n], f"CIFAR-10 {split} ({len(labels[:n])} images, from {source})"

# ============= Stage 1: the VAE whose latents SiT denoises, and SRA 2's target f_VAE ==============

class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)

class VAE(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] <-> latents (N, C, 16, 16); posterior N(mean, exp(logvar)).
    Width 64 is 1.6M parameters; MSE + 1e-5 x KL per element keeps the posterior tame."""

    def __init__(self, width=64, latent_channels=4):
        super().__init__()
        w, C = width, latent_channels
        self.encoder = nn.Sequential(                                       # (N, 3, 32, 32) ->
            nn.Conv2d(3, w, 3, padding=1), ResBlock(w),                     # (N, w, 32, 32)
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), ResBlock(2 * w),   # (N, 2w, 16, 16)
            ResBlock(2 * w), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * C, 3, padding=1))                          # (N, 2C, 16, 16)
        self.decoder = nn.Sequential(                                       # (N, C, 16, 16) ->
            nn.Conv2d(C, 2 * w, 3, padding=1), ResBlock(2 * w), ResBlock(2 * w),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * w, w, 3, padding=1),  # (N, w, 32, 32)
            ResBlock(w), nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1))

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)                      # 2 x (N, C, 16, 16)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)

def to_float(images_u8):
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1

def train_vae(images, args, device):
    torch.manual_seed(VAE_SEED)
    vae = VAE(args.vae_width, args.latent_channels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0)
    pixels, bar = torch.from_numpy(images).to(device), Progress("stage 1: VAE", args.vae_steps)
    for step in range(1, args.vae_steps + 1):
        x = to_float(pixels[torch.randint(len(pixels), (args.vae_batch,), device=device)])
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)   # flips
        with sra2.autocast(device, enabled=device.type == "cuda"):
            mean, logvar = vae.encode(x)
            x_hat = vae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))  # z ~ q(z|x)
        mse = (x_hat.float() - x).square().mean()
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
        opt.zero_grad(set_to_none=True)
        (mse + args.vae_kl * kl).backward()
        opt.step()
        if step % 25 == 0 or step == args.vae_steps:
            bar.update(step, f"mse {mse.item():.4f}  kl {kl.item():.2f}")
    bar.close()
    return vae.eval().requires_grad_(False)

@torch.no_grad()
def encode(vae, images, device, label="stage 1: encoding"):
    """uint8 images (N, 32, 32, 3) -> posterior means and stds (TAEF2: None), (N, C, H, W), CPU."""
    means, stds, bar = [], [], Progress(label, len(images), "img")
    chunk = 100 if isinstance(vae, TAEF2) else 1000       # TAEF2: 100 MB a feature map per 100
    for i in range(0, len(images), chunk):
        mean, logvar = vae.encode(to_float(torch.from_numpy(images[i:i + chunk].copy()).to(device)))
        means.append(mean.float().cpu())
        stds.append(None if logvar is None else (0.5 * logvar.float()).exp().cpu())
        bar.update(i + len(mean))
    bar.close()
    return torch.cat(means), None if stds[0] is None else torch.cat(stds)

def stage1_path(args, data_id):
    if args.vae == "taef2":                               # keyed by the weights and the upsampling
        return Path(args.cache) / f"stage1-taef2-{digest(TAEF2_SHA256, 'bicubic 64', data_id)}.pt"
    settings = dict(width=args.vae_width, channels=args.latent_channels, kl=args.vae_kl,
                    lr=args.vae_lr, steps=args.vae_steps, batch=args.vae_batch, seed=VAE_SEED)
    return Path(args.cache) / f"stage1-{digest(dict(settings, version=2), data_id)}.pt"

def stage1(images, data_id, args, device):
    """The VAE, trained (or TAEF2) or from the cache, the normalised latents of every image and
    its mirror image (2, N, C, H, W) and their posterior standard deviations (TAEF2: None)."""
    path = stage1_path(args, data_id)
    saved = read_cache(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    made = "read from the cache (made in {})" if saved else "made in {}"
    if saved is None:
        tic, vae = time.perf_counter(), train_vae(images, args, device) if args.vae == "own" \
            else load_taef2(args.taef2, args.cache).to(device)
        both = [encode(vae, im, device) for im in (images, images[:, :, ::-1])]    # the mirror
        latents = torch.stack([mean for mean, _ in both])              # (2, N, C, H, W)
        stds = None if args.vae == "taef2" else torch.stack([std for _, std in both])
        # Normalised to mean 0, std 1 (the SD-VAE's 0.18215 is such a scale): the noise
        # eps ~ N(0, I) must be on the latents' scale, and the SRA 2 target inherits it.
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        saved = dict(vae=vae.state_dict(), latents=((latents - shift) * scale).half(),
                     std=None if stds is None else (stds * scale).half(), shift=shift, scale=scale,
                     seconds=time.perf_counter() - tic)
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    vae = VAE(args.vae_width, args.latent_channels) if args.vae == "own" else TAEF2()
    vae.load_state_dict(saved["vae"])
    say(f"stage 1: {args.vae} VAE and latents {tuple(saved['latents'].shape)} (2 flips, shift "
        f"{saved['shift']:+.3f}, scale {saved['scale']:.4f}), {path.name}, "
        + made.format(fmt_time(saved["seconds"])))
    return SimpleNamespace(vae=vae.to(device).eval().requires_grad_(False),
                           latents=saved["latents"].float(), std=saved["std"] if args.vae == "taef2"
                           else saved["std"].float(), shift=saved["shift"], scale=saved["scale"],
                           file=path.name, seconds=saved["seconds"])

@torch.no_grad()
def decode(stage, z):
    """Normalised latents (N, C, H, W) -> uint8 images (N, 32, 32, 3) on the CPU."""
    x = stage.vae.decode(z.float() / stage.scale + stage.shift).float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

# ================ Stage 2: one training run (the baseline when run.align is False) ================

SRA2_KEYS = ("align_depth", "align_loss", "lam", "t_range", "mlp_depth", "mlp_width",
             "target_scale", "target")

def make_run(args, name, label, align, **changes):
    """A stage-2 run: its name (files), label (tables), and SRA 2 settings (args', changed)."""
    run = SimpleNamespace(name=name, label=label, align=align,
                          **{**{key: getattr(args, key) for key in SRA2_KEYS}, **changes})
    run.t_range, width = tuple(run.t_range), run.mlp_width or "2D"
    target = f", target x {run.target_scale:g}" if run.target_scale != 1 else ""
    target += {"mean": "", "sample": ", target a posterior sample",
               "other": ", target another image's latent (control)"}[run.target]
    run.settings = "vanilla" if not align else (
        f"block {run.align_depth}, {run.align_loss}, lambda {run.lam:g}, t in [{run.t_range[0]:g}, "
        f"{run.t_range[1]:g}], {run.mlp_depth}-layer MLP of width {width}{target}")
    return run

def ablation_runs(args):
    """(group, setting, run) rows of Table 1; the default SRA 2 run appears once per group."""
    d0, depth = args.align_depth, model_config(args).depth
    deeper = sorted({min(depth, max(d0 + 1, depth // 2)), min(depth, max(d0 + 2, 2 * depth // 3))}
                    - {d0})
    groups = [("align depth", [(f"{d0}", {})] + [(f"{d}", dict(align_depth=d)) for d in deeper]),
              ("time range", [("[0, 1]", {}), ("[0, 0.5]", dict(t_range=(0.0, 0.5))),
                              ("[0.5, 1]", dict(t_range=(0.5, 1.0)))]),
              ("align loss", [("smooth-L1", {}), ("cosine", dict(align_loss="cosine")),
                              ("L1", dict(align_loss="l1")), ("L2", dict(align_loss="l2"))]),
              ("lambda", [("1.0", {}), ("0.1", dict(lam=0.1))]),
              ("MLP depth", [("5 layers", {}), ("2 layers", dict(mlp_depth=2))])]
    default = make_run(args, "sra2", "SRA 2 (default)", True)
    rows = [("", "vanilla SiT", make_run(args, "vanilla", "vanilla SiT", False))]
    for group, options in groups:
        for setting, change in options:
            slug = "sra2_" + "".join(c if c.isalnum() else "-" for c in f"{group}_{setting}")
            rows.append((group, setting, make_run(args, slug, f"SRA 2, {group} {setting}", True,
                                                  **change) if change else default))
    return rows

def latent_shape(args):
    """(C, H, W) of stage 1's latents: 16x16xC of our VAE, 8x8x32 of TAEF2 (on 64-px images)."""
    return (args.latent_channels, 16, 16) if args.vae == "own" else (32, 8, 8)

def model_config(args):
    """The SiTConfig of --model on stage 1's latents (TAEF2's in 1x1 patches), 10 classes."""
    preset, overrides = DEMO_MODELS.get(args.model, (args.model, {}))
    channels, size, _ = latent_shape(args)
    return sra2.SiTConfig(**{**sra2.PRESETS[preset], **overrides, "input_size": size,
                             "in_channels": channels, "num_classes": 10,
                             **({"patch_size": 1} if args.vae == "taef2" else {})})

def build(args, run, device):
    torch.manual_seed(args.seed)                                       # same SiT init in every run
    model = sra2.SiT(model_config(args)).to(device)
    return model, sra2.make_projector(model, run.mlp_depth, run.mlp_width).to(device) if \
        run.align else None

@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n, device="cpu"):
    """A permutation of the n images and a flip bit each, from (seed, epoch) alone, drawn on the
    CPU (the same on every device) and copied to the device once per epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm, flip = torch.randperm(n, generator=g), torch.randint(0, 2, (n,), generator=g)
    return perm.to(device), flip.to(device)

def batch_indices(step, n, batch_size, seed, device="cpu"):
    """Images and flips of step `step`, a pure function of (seed, step): every run sees the same
    batches and resuming needs only the step. An epoch's last partial batch is dropped."""
    epoch, i = divmod(step, n // batch_size)
    perm, flip = epoch_order(seed, epoch, n, torch.device(device))
    idx = perm[i * batch_size:(i + 1) * batch_size]
    return idx, flip[idx]

def step_noise(generator, seed, step, shape, drop_prob):
    """t, eps and the label-dropout mask of the global batch of step `step`, from (seed, step)
    alone like the batch: each torchrun rank takes its share of what one process would draw."""
    generator.manual_seed((seed + 1) << 32 | step)
    t = torch.rand(shape[0], generator=generator, device=generator.device)       # t ~ U[0, 1)
    eps = torch.randn(shape, generator=generator, device=generator.device)       # eps ~ N(0, I)
    return t, eps, torch.rand(shape[0], generator=generator, device=generator.device) < drop_prob

def train_run(run, stage, labels, args, device, fid_meter, out):
    """Train one run for args.steps (with --resume, from its checkpoint on), measuring the held-out
    loss and FID at their checkpoints; returns its record. Every rank runs it; rank 0 saves."""
    rank, world = rank_and_world()
    model, projector = build(args, run, device)
    ema, sit_params = sra2.create_ema(model), [p for p in model.parameters() if p.requires_grad]
    p_params = list(projector.parameters()) if projector else []
    opt = torch.optim.AdamW(sit_params + p_params, lr=args.lr, weight_decay=0,
                            fused=device.type == "cuda")
    # Clipping SiT and P as one vector (REPA) lets a large alignment gradient shrink the
    # denoising update too; "separate" clips each alone; "none" still measures the norm.
    groups = [sit_params, p_params] if args.clip == "separate" else [sit_params + p_params]
    groups, limit = [g for g in groups if g], math.inf if args.clip == "none" else args.grad_clip
    # The record, plain values (checkpoints hold it, results.json lists it less the grids): log,
    # heldout, evals have an entry per log line (means since the last) and per checkpoint; wall is
    # the train time (s); clipped counts steps above the clip; final_fid, set last, marks the end.
    count = lambda module: sum(p.numel() for p in module.parameters()) if module else 0
    rec = dict(name=run.name, label=run.label, seed=args.seed, settings=run.settings,
               params=count(model), projector_params=count(projector), log=[], heldout=[],
               evals=[], grids={}, wall=0.0, heldout_seconds=0.0, clipped=0)
    path = ckpt_path(args, out, run)
    start, rec = resume(path, args, run, rec, model=model, ema=ema, projector=projector,
                        optimizer=opt)
    if "final_fid" in rec:                                     # finished: its record is reused
        return rec
    net, proj = data_parallel(model, device), data_parallel(projector, device)
    forward = torch.compile(net) if args.compile else net
    latents, labels = stage.latents.to(device), torch.as_tensor(labels).to(device)
    stds = stage.std.to(device) if proj and run.target == "sample" else None
    due = lambda count: {round(args.steps * (i + 1) / count) for i in range(count)}
    eval_steps, heldout_steps = due(args.evals), due(args.heldout_evals)
    generator, mine = torch.Generator(device), slice(rank, None, world)  # this rank's share
    sums = torch.zeros(5, device=device)                   # loss, denoise, align, norm, clipped
    first_bad = torch.zeros((), dtype=torch.long, device=device)   # step of the first NaN or inf
    last_log, saved, last_save = start, start or None, time.perf_counter()
    bar, tic = Progress(f"stage 2: {run.label}", args.steps), time.perf_counter()
    stop = catch_ctrl_c()                                      # Ctrl-C: stop after a step, saved
    for step in range(start + 1, args.steps + 1):
        idx, flip = batch_indices(step - 1, len(labels), args.batch_size, args.seed, device)
        t, eps, drop = step_noise(generator, args.seed, step, (args.batch_size, *latents.shape[2:]),
                                  model.config.class_dropout_prob)
        # The control: the global batch rolled by one, image i pulled toward image i - 1's latent.
        other = latents[flip.roll(1, 0), idx.roll(1, 0)][mine] if run.target == "other" else None
        idx, flip, t, eps, drop = idx[mine], flip[mine], t[mine], eps[mine], drop[mine]
        z, y = latents[flip, idx], labels[idx]                 # (B / world, C, 16, 16), (B / world)
        goal = z if stds is None else z + stds[flip, idx] * torch.randn(       # z ~ q(z | x),
            (args.batch_size, *z.shape[1:]), generator=generator, device=device)[mine]  # drawn
        # after step_noise's draws, so t, eps and the dropped labels stay those of the baseline
        goal = goal if other is None else other
        target = sra2.patchify(goal, model.config.patch_size) * run.target_scale if proj else None
        with sra2.autocast(device, enabled=args.precision == "bf16"):
            parts = sra2.training_loss(forward, z, y, proj, lam=run.lam, t=t, eps=eps,
                                       align_depth=run.align_depth, align_loss=run.align_loss,
                                       t_range=run.t_range, drop_labels=drop, target=target)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()                               # DDP: gradients averaged over ranks
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(g, limit) for g in groups])  # before
        opt.step()
        sra2.update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))   # warm-up
        terms = torch.stack([parts["loss"], parts["denoise"], parts["align"],
                             norms.square().sum().sqrt()]).detach()   # grad norm of SiT and P
        sums += torch.cat([terms, (norms > args.grad_clip).any().float()[None]])
        first_bad = torch.where((first_bad == 0) & ~terms.isfinite().all(), step, first_bad)
        if step == start + 1:                  # compile and start-up are not train time (both runs)
            tic = synced_clock(device)
        ckpt_due = args.ckpt_every > 0 and step % args.ckpt_every == 0 or bool(stop)
        if step % args.log_every and step not in eval_steps | heldout_steps and not ckpt_due:
            continue                                           # one host sync per log line
        if world > 1:                                          # the global batch's numbers
            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        loss, denoise, align, norm, clipped = (sums / (world * (step - last_log))).tolist()
        rec["clipped"] += round(clipped * (step - last_log))
        sums.zero_()
        if first_bad:                                          # stop before a checkpoint saves it
            catch_ctrl_c(False)
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            kept = f"the last good checkpoint, step {saved}, is kept: {path}" if saved else \
                "no checkpoint yet"
            raise DemoError(f"{run.label}: {what} at step {first_bad.item()}; stopping ({kept})")
        rec["wall"], last_log = rec["wall"] + synced_clock(device) - tic, step
        rec["log"].append(dict(step=step, loss=loss, denoise=denoise, align=align, grad_norm=norm,
                               wall=rec["wall"]))
        bar.update(step, f"loss {loss:.4f} (denoise {denoise:.4f}, align {align:.4f})",
                   elapsed=rec["wall"])
        if step in heldout_steps:
            tic = time.perf_counter()
            rec["heldout"].append(dict(step=step, wall=rec["wall"],
                                       **heldout_loss(ema, stage.heldout)))
            rec["heldout_seconds"] += synced_clock(device) - tic
        if step in eval_steps:                                 # a point of the FID curve
            bar.close()
            images = generate(ema, stage, args.fid_n, args.fid_sampling_steps, args, device,
                              f"{run.label} @ {step}")
            rec["evals"].append(dict(step=step, wall=rec["wall"],
                                     fid=from_rank0(fid_meter, images)))
            rec["grids"][step] = images[:100]
            say(f"  {run.label} step {step}: {args.ckpt_fid} {rec['evals'][-1]['fid']:.2f}  "
                f"(train time {fmt_time(rec['wall'])}, {step / rec['wall']:.1f} it/s)")
        minutes = (time.perf_counter() - last_save) / 60
        if rank == 0 and (ckpt_due or stop or 0 < args.ckpt_minutes < minutes):   # stop: also
            # a Ctrl-C that came during the evaluations above
            save_checkpoint(path, model, ema, projector, opt, step, args, run, rec)
            saved, last_save = step, time.perf_counter()
        if stop:
            catch_ctrl_c(False)
            raise Interrupted(f"interrupted (Ctrl-C): {run.label} stopped at step {step} of "
                              f"{args.steps}, saved to {path}; the same command with --resume "
                              "goes on from there")
        tic = time.perf_counter()                              # evaluations and saves don't count
    catch_ctrl_c(False)
    bar.close()
    rec["final_fid"] = None                                    # the key marks a finished run
    if args.final_fid_n:
        images = generate(ema, stage, args.final_fid_n, args.final_sampling_steps, args, device,
                          f"{run.label} final")
        rec.update(final_fid=from_rank0(fid_meter, images), final_grid=images[:100])
    if rank == 0 and (args.ckpt_minutes > 0 or args.ckpt_every > 0):   # the finished run
        save_checkpoint(path, model, ema, projector, opt, args.steps, args, run, rec)
    return rec

# ========================= Measure: the held-out loss, samples for FID ============================

@torch.no_grad()
def heldout_set(args, stage, device):
    """--heldout-n test images as normalised posterior-mean latents z, image i at t = (i mod 12 +
    0.5) / 12, one fixed eps: every run, seed and checkpoint is judged on the same z, y, t, eps."""
    images, labels, _ = load_data(args, "test")
    z = (encode(stage.vae, images, device, "held-out set")[0] - stage.shift) * stage.scale
    grid = (torch.arange(HELDOUT_T, dtype=torch.float64) + 0.5) / HELDOUT_T
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED))
    return SimpleNamespace(z=z.to(device), y=torch.as_tensor(labels).to(device), eps=eps.to(device),
                           t=grid[torch.arange(len(z)) % HELDOUT_T].float().to(device))

@torch.no_grad()
def heldout_loss(model, held, batch=100):
    """The denoising term |v_theta(x_t, t, y) - (eps - z)|^2 on the held-out set, overall and per
    band of t (low t: little noise); labels given, float32 without autocast (TF32 on CUDA)."""
    per_image = []
    with torch.autocast(held.z.device.type, enabled=False):
        for z, y, t, eps in zip(*(v.split(batch) for v in (held.z, held.y, held.t, held.eps))):
            x_t, v_target = sra2.interpolate(z, eps, t)                # x_t = (1 - t) z + t eps
            per_image.append((model(x_t, t, y).float() - v_target).square().mean((1, 2, 3)))
    per_image = torch.cat(per_image)                                   # (n,)
    bands = {name: per_image[(held.t >= lo) & (held.t < hi)].mean().item()
             for name, (lo, hi) in HELDOUT_BANDS.items()}
    return dict(loss=per_image.mean().item(), **bands)

@torch.no_grad()
def generate(model, stage, n, num_steps, args, device, label):
    """n images (uint8 NHWC) from the papers' Euler-Maruyama SDE, no CFG, image i of class i % 10;
    chunk c's noise is seeded by (seed, c): matched across runs, steps and torchrun's ranks."""
    rank, world = rank_and_world()
    chunks = list(enumerate((torch.arange(n, device=device) % 10).split(args.sample_batch)))
    mine = chunks[rank::world]                                         # this rank's chunks
    done, bar = [], Progress(f"  sampling {label}", sum(len(y) for _, y in mine), "img")
    for chunk, y in mine:
        generator = torch.Generator(device).manual_seed(10_007 * (args.seed + 1) + chunk)
        noise = torch.randn(len(y), *latent_shape(args), generator=generator, device=device)
        with sra2.autocast(device, enabled=args.precision == "bf16"):
            z = sra2.sample_sde(model, noise, y, num_steps=num_steps, generator=generator)
        done.append((chunk, decode(stage, z)))
        bar.update(sum(len(images) for _, images in done))
    bar.close()
    return torch.cat([images for _, images in gather_chunks(done)])

def reach(xs, fids, target):
    """(x from which the piecewise-linear curve stays at FID <= target: its last crossing, as a
    noisy curve can dip and come back; exact): x None if it ends above, exact False if always
    below."""
    if fids[-1] > target:
        return None, True
    above = [i for i, f in enumerate(fids) if f > target]
    if not above:
        return xs[0], False
    (xa, fa), (xb, fb) = (xs[above[-1]], fids[above[-1]]), (xs[above[-1] + 1], fids[above[-1] + 1])
    return xa + (xb - xa) * (fa - target) / (fa - fb), True

# ====================================== Tables and pictures =======================================

def report(args, runs, records, out, card, data, quick, seconds):
    """Per seed (and the seeds' mean) a table of the runs as they end, then the clipping, the time
    per step and the speed-up: printed and in table.txt; every number in results.json; pictures."""
    names, seeds, speedups = list(dict.fromkeys(run.name for _, _, run in runs)), args.seeds, {}
    if len(seeds) > 1:
        records = {**records, **{(name, "mean"): mean_record([records[name, k] for k in seeds])
                                 for name in names}}
        seeds = [*seeds, "mean"]
    lines = [f"tiny_demo results, {time.strftime('%Y-%m-%d %H:%M')}, on {card}",
             *([quick] if quick else []), f"data: {data}", describe(args),
             f"SRA 2: {make_run(args, '', '', True).settings}",
             f"FID: EMA weights, no CFG, against {args.fid_ref_n} training images, tf convention"]
    for seed in seeds[-1:] if args.ablate else seeds:
        lines += ["", *seed_table(args, runs, records, seed)]
        if names == ["baseline", "sra2"]:
            lines += pair_lines(args, records["baseline", seed], records["sra2", seed], speedups)
    say("", *lines, "", f"total wall time {fmt_time(seconds)}")
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    if not args.ablate:
        pictures(args, records, names, out, quick)
    results = dict(settings=vars(args), card=card, machine=machine(), data=data,
                   total_seconds=seconds, step_fraction_to_baseline_fid=speedups, runs=[
                       {k: v for k, v in r.items() if k not in ("grids", "final_grid")}
                       for (_, seed), r in records.items() if seed != "mean"])
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1,
                                                                             default=str)))

def seed_table(args, runs, records, seed):
    """Table 2 (Table 1 with --ablate) of one seed: each run as it ends; SRA 2's held-out gap to
    the baseline in brackets, paired (the same test images, t and noise)."""
    recs = [records[run.name, seed] for _, _, run in runs]
    base = next((r for r in recs if not r["projector_params"]), None)
    last = lambda r, key, field, spec=".2f": fmt(r[key][-1][field] if r[key] else None, spec)
    gap = lambda r, k: "" if base in (None, r) else \
        f" ({100 * (r['heldout'][-1][k] / base['heldout'][-1][k] - 1):+.2f}%)"
    row = lambda r: [fmt_time(r["wall"]), last(r, "evals", "fid"),
                     *[fmt(r["final_fid"])] * bool(args.final_fid_n),
                     last(r, "log", "denoise", ".4f"),
                     last(r, "log", "align", ".4f") if r["projector_params"] else "-",
                     *(last(r, "heldout", k, ".4f") + gap(r, k) for k in ("loss", *HELDOUT_BANDS)
                       if args.heldout_evals)]
    heads = ["train time", args.ckpt_fid, *[args.final_fid] * bool(args.final_fid_n), "denoise",
             "align"] + [
        "held-out loss", *(f"{band} t" for band in HELDOUT_BANDS)] * bool(args.heldout_evals)
    title = (f"{'Table 1' if args.ablate else 'Table 2'} in miniature, seed {seed}: {args.model}, "
             f"{args.steps} steps, no CFG (P is dropped at inference: both sample with the same "
             "SiT)") + (f"; held-out loss: the denoising term on {args.heldout_n} test images at a "
                        "fixed t grid and noise, EMA weights, in brackets SRA 2 - baseline"
                        if args.heldout_evals else "")
    rows = [[group, setting, *row(records[run.name, seed])] for group, setting, run in runs] if \
        args.ablate else [[r["label"], f"{r['params'] / 1e6:.1f}M", *row(r)] for r in recs]
    return [title, *table((["design", "setting"] if args.ablate else ["model", "params"]) + heads,
                          rows)]

def pair_lines(args, base, sra, speedups):
    """The clipping, the time per step, and the speed-up: the fraction of the steps SRA 2 needs
    for the baseline's final FID (where its FID curve last crosses it)."""
    lines = [] if base["seed"] == "mean" else [
        f"time per step: SRA 2 {100 * (sra['wall'] / base['wall'] - 1):+.1f}% against the baseline "
        f"(the first step is not timed); gradient norm above the clip {args.grad_clip:g} "
        f"({args.clip} clipping): baseline {base['clipped']}, SRA 2 {sra['clipped']} of "
        f"{args.steps} steps"]
    if not args.evals:
        return lines
    steps, fids, target = [e["step"] for e in base["evals"]], [e["fid"] for e in sra["evals"]], \
        base["evals"][-1]["fid"]
    (x, exact), wall = reach(steps, fids, target), reach([e["wall"] for e in sra["evals"]], fids,
                                                         target)[0]
    speedups[str(base["seed"])] = x and x / steps[-1]
    return lines + [f"speed-up ({args.ckpt_fid} curve): the baseline ends at FID {target:.2f} "
                    f"after {steps[-1]} steps; SRA 2 " + (
                        f"does NOT end at or below it (final {fids[-1]:.2f}, best {min(fids):.2f}):"
                        " no speed-up at this scale and length" if x is None else
                        f"reaches it at step {x:.0f}, {x / steps[-1]:.2f} of the steps "
                        f"({'' if exact else 'at most: already at its first checkpoint; '}wall-"
                        f"clock {fmt_time(wall)} against {fmt_time(base['wall'])})")]

def pictures(args, records, names, out, quick):
    """Every run's curves as line charts; the matched sample grids of the first seed."""
    runs = [records[name, seed] for seed in args.seeds for name in names]
    curve = lambda r, key, x, y, what="": (
        r["label"] + (f" (seed {r['seed']})" if len(args.seeds) > 1 else "") + what,
        [e[x] for e in r[key]], [e[y] for e in r[key]])
    fid_title = f"{args.ckpt_fid} (SDE, EMA) of {args.model} on %dx%dx%d" % latent_shape(args)[::-1]
    series = lambda key, x, y: [curve(r, key, x, y) for r in runs]
    losses = [curve(r, "log", "step", term, f": {term}") for r in runs
              for term in ("denoise", "align")[:1 + bool(r["projector_params"])]]
    charts = [("loss_curves", losses, f"training losses (mean over {args.log_every} steps)",
               "training steps", "loss")]
    if args.evals:
        charts += [("fid_vs_steps", series("evals", "step", "fid"), fid_title, "training steps",
                    "FID"), ("fid_vs_time", series("evals", "wall", "fid"), fid_title,
                             "training wall-clock (s, evaluations excluded)", "FID")]
    if args.heldout_evals:
        charts += [("heldout_loss", series("heldout", "step", "loss"), "held-out denoising loss, "
                    f"{args.heldout_n} test images (EMA)", "training steps", "loss")]
    for name, lines, title, xlabel, ylabel in charts:
        line_chart(out / f"{name}.png", lines, title, xlabel, ylabel, True, quick)
    if names != ["baseline", "sra2"]:
        return
    base, sra = records["baseline", args.seeds[0]], records["sra2", args.seeds[0]]
    for b, a in zip(base["evals"], sra["evals"]):
        panels(out / f"samples_step{b['step']:06d}.png", [
            (f"baseline, {args.ckpt_fid} {b['fid']:.1f}", base["grids"][b["step"]]),
            (f"SRA 2, {args.ckpt_fid} {a['fid']:.1f}", sra["grids"][a["step"]])],
            f"step {b['step']}: same noise, same labels (image i has class i % 10)", quick)
    if args.final_fid_n:
        panels(out / "samples_final.png", [
            (f"baseline, {args.final_fid} {base['final_fid']:.1f}", base["final_grid"]),
            (f"SRA 2, {args.final_fid} {sra['final_fid']:.1f}", sra["final_grid"])],
            f"step {args.steps}, {args.final_sampling_steps}-step SDE", quick)

# ============================================== Main ==============================================

def main(argv=None):
    args, threads = parse_args(argv), torch.get_num_threads()
    try:
        check(args)
        device, out, card = setup(args)
        records = experiment(args, device, out, card)
        if dist.is_initialized():
            dist.barrier()                                     # no rank leaves while another talks
        return records
    except (DemoError, FileNotFoundError) as error:            # FileNotFound: Inception weights
        fail("tiny_demo: error: " + " ".join(str(error).split()))         # in the log too
        raise SystemExit(getattr(error, "status", 2))
    except KeyboardInterrupt:                                  # a second Ctrl-C, or not training
        fail("tiny_demo: interrupted (Ctrl-C); checkpoints saved before it are kept")
        raise SystemExit(130)
    finally:                                                   # main() may be called in-process
        torch.set_num_threads(threads)
        teardown()

def experiment(args, device, out, card):
    """Data, stage 1, the runs of every seed, tables and pictures; returns the records."""
    tic, rank = time.perf_counter(), rank_and_world()[0]
    args.precision = sra2.default_precision(device) if args.precision == "auto" else args.precision
    quick = "QUICK MODE (smoke test: tiny settings, numbers NOT meaningful)" if args.quick else None
    images, labels, data = rank0_first(load_data, args)               # rank 0 downloads
    args.data_id = digest(images.tobytes(), labels.tobytes())  # a resume must see the same data
    args.fid_ref_n = min(args.fid_ref_n, len(labels))         # what the reference really holds
    if args.batch_size > len(labels):
        raise DemoError(f"--batch-size {args.batch_size} is more than the {len(labels)} training "
                        "images")
    runs = ablation_runs(args) if args.ablate else [
        ("", "", make_run(args, name, label, name == "sra2")) for name, label in
        (("baseline", args.model), ("sra2", f"{args.model} + SRA 2")) if name in args.runs]
    check_checkpoints(args, runs, out)                        # before any work or any write
    say(f"tiny_demo on {card}: {data}", *([quick] if quick else []), describe(args))
    uses_fid = args.evals > 0 or args.final_fid_n > 0
    if device.type == "cpu" and not args.quick and rank == 0:    # long runs say so at once
        n_runs = len({run.name for _, _, run in runs}) * len(args.seeds)
        say(estimate(args, time_per_image(args, device, uses_fid), n_runs,
                     stage1_path(args, args.data_id).is_file(), not uses_fid or
                     reference_path(args, args.data_id, args.fid_ref_n).is_file()))
    fid_meter = FIDMeter(args, images, args.data_id, device) if rank == 0 and uses_fid else None
    stage = rank0_first(stage1, images, args.data_id, args, device)    # rank 0 trains it
    stage.heldout = heldout_set(args, stage, device) if args.heldout_evals else None
    # Which stage 1: VAE training is not bit-reproducible across machines, so runs are paired
    # (and compared) only on the same latents.
    data += f"; stage 1 {stage.file}, latent shift {stage.shift:+.6f}, scale {stage.scale:.6f}"
    if rank == 0:
        recon = decode(stage, stage.latents[0, :50].to(device))
        panels(out / "vae_reconstructions.png", [("real", images[:50]), ("VAE reconstruction",
               recon)], f"stage 1: {args.vae} VAE 32x32x3 -> %dx%dx%d -> 32x32x3" %
               latent_shape(args)[::-1], quick)
    records = {}                                              # (run name, seed) -> record
    for args.seed in args.seeds:
        for run in (run for _, _, run in runs if (run.name, args.seed) not in records):
            records[run.name, args.seed] = train_run(run, stage, labels, args, device, fid_meter,
                                                     out)
    args.seed = args.seeds[0]
    if rank == 0:
        report(args, runs, records, out, card, data, quick, time.perf_counter() - tic)
    return records

def time_per_image(args, device, uses_fid):
    """Seconds per image, on this CPU, of a SiT + P training step, a VAE training step and an
    Inception pass (the faster of two timed calls after two warm-ups): for demo_infra.estimate."""
    timed = lambda fn, n: min(np.diff([(fn(), time.perf_counter())[1] for _ in range(4)])[1:]) / n
    b = min(args.batch_size, 64)
    model, projector = build(args, make_run(args, "sra2", "", True), device)
    z, y = torch.randn(b, *latent_shape(args)), torch.zeros(b, dtype=torch.long)
    vae, x = VAE(args.vae_width, args.latent_channels) if args.vae == "own" else TAEF2(), \
        torch.zeros(b, 3, 32, 32)              # TAEF2 is only run forward: its stage 1 encodes
    vae_step = (lambda: vae.decode(vae.encode(x)[0]).mean().backward()) if args.vae == "own" \
        else torch.no_grad()(lambda: vae.encode(x))
    net = load_inception(args, device) if uses_fid else None   # fails here without the weights
    blank = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)                # 4 black images

    def sit_step():                                                     # in the run's precision
        with sra2.autocast(device, enabled=args.precision == "bf16"):
            loss = sra2.training_loss(model, z, y, projector)["loss"]
        loss.backward()
    return dict(sit=timed(sit_step, b), vae=timed(vae_step, b),
                inception=timed(lambda: net(fid.preprocess(blank)), 4) if uses_fid else 0.0)

if __name__ == "__main__":
    main()
