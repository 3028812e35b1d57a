#!/usr/bin/env python3
"""tiny_demo.py: does SRA 2 make a diffusion transformer converge faster? CIFAR-10 on one GPU.

    python tiny_demo.py                  # the demo on one GPU (--help lists every knob)
    python tiny_demo.py --preset cpu     # the same question on two CPU cores (smaller SiT)
    python tiny_demo.py --quick          # CPU smoke test of the whole pipeline (synthetic data)
    python tiny_demo.py --ablate         # Table 1 of the paper in miniature
    python tiny_demo.py ... --resume     # after a crash or a kill: the same flags, plus --resume
    torchrun --nproc_per_node=N tiny_demo.py   # N GPUs (DDP): the same run, the batch split N ways

The file reads as the pipeline: settings; data (CIFAR-10, downloaded once and MD5-checked, or
--data PATH, or synthetic shapes); stage 1 (a small KL conv VAE, 32x32x3 -> 16x16x4, trained once,
the latents of every image and its mirror image cached: f_VAE exists before stage 2, the paper's
premise); stage 2 (SiT on the latents, trained twice with the same seed, init, batches and noise:
the baseline, and SRA 2 with projector P on block align_depth pulled toward the clean latent);
measure (the held-out loss: the denoising term on test images at a fixed t grid with fixed noise;
FID of EMA samples, no CFG, the same sampling noise in both runs, against the training images);
pictures and tables (table.txt, results.json, log.txt and PNGs in --out); main. After it comes
the infrastructure: checkpoints and resume, DDP helpers, chart drawing, small utilities.

Conventions are sra2.py's: t = 0 data, t = 1 noise, x_t = (1 - t) z + t eps, v = eps - z.
z (N, 4, 16, 16) is the normalised VAE latent, which is also f_VAE, the alignment target.
The batch, t, eps and label-dropout mask of step k are functions of (seed, k) alone: both runs see
them, a resumed run needs only k (it ends bit for bit where an uninterrupted run ends on a CPU),
and torchrun's ranks take shares of one draw. FID-2k is biased upward against FID-50k: compare it
only with itself; the speed-up is where SRA 2's FID curve last crosses the baseline's final FID.
"""
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel

import fid
import sra2
from fid import OneLineParser, Progress, atomic_write, fmt_time

# =============================================================================================
# Settings
# =============================================================================================

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
VAE_SEED = 0             # one VAE for every --seed: stage 1 is given, as the SD-VAE is in the paper
SMALL_FID = 256          # up to this many images, FID takes the exact n x n route (fid_small)
HELDOUT_T = 12           # the held-out set's t grid: (j + 0.5) / 12, image i at grid point i % 12
HELDOUT_SEED = 20_260    # its noise: one fixed draw, the same for every run, seed and checkpoint
HELDOUT_BANDS = {"low": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "high": (2 / 3, 1)}   # t in [lo, hi)
# SiTs beyond the paper's presets, for CPU runs: (preset, overrides). Head dim 64 as in SiT.
DEMO_MODELS = {"tiny": ("SiT-S/2", dict(depth=4, hidden_size=128, num_heads=2)),
               "small": ("SiT-S/2", dict(depth=8, hidden_size=128, num_heads=2))}
# The presets, knob by knob: (full, cpu, quick, help). full: SiT-S/2, the paper's smallest /2
# model (its lr 1e-4 is for 400K steps; a run of minutes needs more); cpu: the question on two CPU
# cores (README, Results); quick: everything runs in seconds, its numbers mean nothing (one
# thread: its ops are small). Every knob is also a flag; a flag given wins.
PRESETS = ("full", "cpu", "quick")
KNOBS = {"model": ("SiT-S/2", "small", "tiny", "SiT preset, or tiny (4 blocks, D 128), small (8)"),
         "steps": (4000, 1200, 60, "training steps per run"),
         "batch_size": (256, 64, 32, "global batch"),
         "lr": (3e-4, 3e-4, 1e-3, "AdamW learning rate, the same for both runs"),
         "n_images": (None, 10000, 1024, "use the first N training images"),
         "vae_width": (64, 32, 16, "VAE channels at 32x32"),
         "vae_steps": (3000, 400, 80, ""),
         "vae_batch": (256, 64, 32, ""),
         "evals": (5, 3, 5, "FID checkpoints per run, 0 = none (--ablate: 1)"),
         "fid_n": (2000, 250, 8, "images per checkpoint FID"),
         "fid_sampling_steps": (50, 25, 10, "SDE steps for the checkpoint FIDs"),
         "final_fid_n": (5000, 0, 12, "images for the final FID, 0 = none"),
         "final_sampling_steps": (250, 50, 25, "SDE steps for the final FID"),
         "fid_ref_n": (50000, 1000, 32, "training images in the FID reference"),
         "sample_batch": (1000, 250, 64, "images per sampler batch"),
         "log_every": (50, 25, 5, "steps per log line"),
         "heldout_n": (2000, 1000, 24, "test images in the held-out set"),
         "heldout_evals": (10, 8, 3, "held-out loss checkpoints, 0 = none"),
         "seed": ("0", "0,1", "0", "one seed, or several comma-separated"),
         "threads": (None, 2, 1, "CPU threads (none: torch's)")}


class DemoError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""


def parse_args(argv=None):
    """The settings `args`: flags over the preset's values (--help shows each preset's)."""
    p = OneLineParser(prog="tiny_demo", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--preset", default="full", choices=PRESETS, help="full: one GPU; cpu: two CPU cores; "
        "quick: a smoke test (%(default)s)")
    add("--quick", action="store_true", help="the same as --preset quick")
    add("--ablate", action="store_true", help="Table 1 in miniature: one run per design choice")
    add("--out", default="demo_out", help="table, PNGs, log, results.json, ckpt/ (%(default)s)")
    add("--data", help="cifar-10-batches-py folder, its .tar.gz, or 'synthetic' (default: "
        "download into --cache; --quick: synthetic)")
    add("--cache", default=os.environ.get("SRA2_CACHE", str(Path.home() / ".cache" / "sra2")),
        help="download, stage-1 and FID-reference cache (%(default)s; env SRA2_CACHE)")
    add("--inception", default=os.environ.get(fid.WEIGHTS_ENV),
        help=f"FID Inception weights .pth (default: env {fid.WEIGHTS_ENV}, else fid.py's)")
    add("--device", help="cuda, mps or cpu (default: cuda, then mps, then cpu)")
    add("--compile", action="store_true", help="torch.compile the SiT (pays on long CUDA runs)")
    add("--resume", action="store_true", help="continue each run from --out/ckpt/<run>.pt")
    for key, (*values, text) in KNOBS.items():               # default None: the preset's value
        add("--" + key.replace("_", "-"), type=type(values[-1]), default=None,
            help=f"{text} ({'; '.join(f'{n} {v}' for n, v in zip(PRESETS, values))})".lstrip(),
            **dict(choices=[*sra2.PRESETS, *DEMO_MODELS], metavar="NAME") if key == "model" else {})
    add("--runs", default="baseline,sra2", help="which runs to train (%(default)s)")
    add("--grad-clip", type=float, default=1.0, help="gradient norm clip (%(default)s)")
    add("--clip", default="joint", choices=("joint", "separate", "none"),
        help="clip SiT and P as one vector (REPA), each on its own, or not (%(default)s)")
    add("--ema-decay", type=float, default=0.9999, help="cap of the EMA warm-up (%(default)s)")
    add("--align-depth", type=int, help="aligned block, 1-indexed (default: the preset's)")
    add("--align-loss", default="smooth_l1", choices=sra2.ALIGN_LOSSES, help="(%(default)s)")
    add("--mlp-depth", type=int, default=5, help="projector layers (%(default)s)")
    add("--mlp-width", type=int, help="projector width (default 2D)")
    add("--target-scale", type=float, default=1.0, help="SRA 2 target = this x the latent (1)")
    add("--target", default="mean", choices=("mean", "sample"),
        help="SRA 2 target: the posterior mean, or a fresh posterior sample each step (mean)")
    add("--lam", type=float, default=1.0, help="weight of the alignment loss (%(default)s)")
    add("--t-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
        help="align only where t in [LO, HI], t = 0 data (0 1)")
    add("--ckpt-minutes", type=float, default=3.0, help="checkpoint period, 0 = never (3)")
    add("--ckpt-every", type=int, default=0, help="also a checkpoint every N steps (0: never)")
    add("--vae-lr", type=float, default=3e-4, help="(%(default)s)")
    add("--vae-kl", type=float, default=1e-5, help="KL weight per latent element (%(default)s)")
    add("--latent-channels", type=int, default=4, help="(%(default)s)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.preset = "quick" if args.quick else args.preset
    args.quick, evals_given = args.preset == "quick", args.evals is not None
    for key, values in KNOBS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[PRESETS.index(args.preset)])
    args.data = "synthetic" if args.quick and args.data is None else args.data
    args.evals = 1 if args.ablate and not evals_given else args.evals   # Table 1: the end only
    return args


def parse_seeds(text):
    try:
        return [int(v) for v in str(text).split(",")]
    except ValueError:
        return None


# What each flag must be, checked in this order: (flags, ok(value, args), need). A bad value gets
# one line: "--flag must be <need>, got <value>", or `need` itself where it names the flag. A
# value of None (left open by the preset) passes.
FLAG_RULES = [
    (("lr", "grad_clip", "ema_decay", "target_scale", "lam", "t_range", "ckpt_minutes", "vae_lr",
      "vae_kl"), lambda v, a: all(map(math.isfinite, np.atleast_1d(v))), "a finite number"),
    (("seed",), lambda v, a: parse_seeds(v) is not None,
     "{flag} {v!r}: need an integer or comma-separated integers"),
    (("seed",), lambda v, a: len(set(parse_seeds(v))) == len(parse_seeds(v))
     and all(0 <= seed < 2**31 for seed in parse_seeds(v)),
     "{flag} {v!r}: need distinct seeds in 0..2147483647"),
    (("steps", "batch_size", "threads", "n_images", "vae_steps", "vae_batch", "vae_width",
      "sample_batch", "mlp_depth", "mlp_width", "log_every", "latent_channels",
      "fid_sampling_steps", "final_sampling_steps"), lambda v, a: v >= 1, ">= 1"),
    (("evals", "heldout_evals", "ckpt_every", "ckpt_minutes", "vae_kl", "lam"),
     lambda v, a: v >= 0, ">= 0"),
    (("lr", "grad_clip", "target_scale", "vae_lr"), lambda v, a: v > 0, "> 0"),
    (("fid_n", "fid_ref_n"), lambda v, a: v >= 2, ">= 2 (FID needs a covariance)"),
    (("final_fid_n",), lambda v, a: v == 0 or v >= 2,
     ">= 2 (FID needs a covariance), or 0 for none"),
    (("heldout_n",), lambda v, a: v >= HELDOUT_T or not a.heldout_evals,
     f">= {HELDOUT_T} (one image per point of the t grid)"),
    (("ema_decay",), lambda v, a: 0 <= v < 1, "in [0, 1)"),
    (("t_range",), lambda v, a: 0 <= v[0] < v[1] <= 1,
     "LO HI with 0 <= LO < HI <= 1 (t = 0 data, t = 1 noise)"),
    (("runs",), lambda v, a: set(v.split(",")) <= {"baseline", "sra2"}
     and len(set(v.split(","))) == len(v.split(",")),
     "{flag} {v!r}: need baseline, sra2 or baseline,sra2"),
    (("batch_size",), lambda v, a: v % torchrun_world() == 0, "{flag} {v} does not split evenly "
     "over {world} processes (the global batch is shared out across torchrun's ranks)"),
    (("vae_width",), lambda v, a: v % 8 == 0, "a multiple of 8 (GroupNorm groups)"),
    (("steps",), lambda v, a: max(a.evals, a.heldout_evals) <= v,
     "--evals {a.evals} / --heldout-evals {a.heldout_evals}: more than --steps {v}"),
    (("align_depth",), lambda v, a: 1 <= v <= model_config(a)[2].depth,
     "{flag} {v} is beyond {a.model}'s {depth} blocks (choose 1..{depth})"),
]


def check(args):
    """Every impossible setting as one line (FLAG_RULES), before any work; then the derived ones."""
    config = model_config(args)[2]
    args.align_depth = config.align_depth if args.align_depth is None else args.align_depth
    for names, ok, need in FLAG_RULES:
        for name in (name for name in names if getattr(args, name) is not None):
            value = getattr(args, name)
            if not ok(value, args):
                shown = value if isinstance(value, str) else " ".join(
                    f"{x:g}" for x in np.atleast_1d(value))
                line = need if "{flag}" in need or "--" in need else "{flag} must be " + need + \
                    ", got {v}"
                raise DemoError(line.format(flag="--" + name.replace("_", "-"), v=shown, a=args,
                                            world=torchrun_world(), depth=config.depth))
    args.seeds = parse_seeds(args.seed)
    args.seed, args.runs = args.seeds[0], args.runs.split(",")
    args.ckpt_fid = f"{fid_name(args.fid_n)} {args.fid_sampling_steps}-step"
    args.final_fid = f"{fid_name(args.final_fid_n)} {args.final_sampling_steps}-step"


def fid_name(n):
    """FID-2k, FID-250: FIDs compare only at equal image counts (and samplers)."""
    return f"FID-{n // 1000}k" if n % 1000 == 0 else f"FID-{n}"


def describe(args):
    """The settings that make the run what it is, in one line (printed first)."""
    fids = (f"{args.ckpt_fid} at {args.evals} checkpoints" if args.evals else "no FID checkpoints")
    fids += f", {args.final_fid} at the end" if args.final_fid_n else ""
    heldout = (f"held-out loss on {args.heldout_n} test images at {args.heldout_evals} checkpoints"
               if args.heldout_evals else "no held-out loss")
    return (f"preset {args.preset}: {args.model}, {args.steps} steps of batch {args.batch_size}, "
            f"lr {args.lr:g}, {args.clip} clip {args.grad_clip:g}, seeds {args.seeds}, "
            f"{', '.join(args.runs)}; {heldout}; {fids}")


# =============================================================================================
# Data: CIFAR-10 from the official archive or a folder, or synthetic shapes
# =============================================================================================


class ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: load numpy arrays and plain values, refuse any other global
    (a doctored data file cannot run code)."""
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
               for n in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_cifar_batch(name, raw):
    """One pickled batch -> (images uint8 (n, 32, 32, 3), labels int64 (n,))."""
    bad = f"{name}: corrupt CIFAR-10 batch file"
    try:
        batch = ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:                                 # a bad pickle can raise anything
        raise DemoError(f"{bad} ({type(error).__name__}: {error})") from None
    if data.dtype != np.uint8 or data.shape[1:] != (3072,) or len(labels) != len(data):
        raise DemoError(f"{bad} (data {data.dtype} {data.shape}, {len(labels)} labels; expected "
                        "uint8 (n, 3072) and n labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DemoError(f"{bad} (labels outside 0..9)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels    # R,G,B planes -> NHWC


def read_cifar(path, split="train"):
    """A split of CIFAR-10 from a cifar-10-batches-py folder (or its parent) or the .tar.gz."""
    path = Path(path).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not path.exists():
        raise DemoError(f"--data {path}: no such file or folder")
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        missing = ", ".join(n for n in names if not (folder / n).is_file())
        if missing:
            raise DemoError(f"--data {path}: not a CIFAR-10 python folder ({missing} missing)")
        raws = [(str(folder / n), (folder / n).read_bytes()) for n in names]
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = ", ".join(n for n in names if n not in members)
                if missing:
                    raise DemoError(f"{path}: not the CIFAR-10 python archive ({missing} missing)")
                raws = [(f"{path}:{n}", tar.extractfile(members[n]).read()) for n in names]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise DemoError(f"{path}: corrupt or truncated archive ({type(error).__name__}: "
                            f"{error})") from None
    parts = [parse_cifar_batch(name, raw) for name, raw in raws]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(cache):
    """The official archive in `cache`, downloaded once; only a file with the right MD5 is kept."""
    archive = Path(cache) / "cifar-10-python.tar.gz"
    if archive.is_file():
        if md5_of(archive) != CIFAR_MD5:
            raise DemoError(f"{archive}: MD5 mismatch (corrupt file); delete it to download again")
        return archive

    def fetch(tmp):
        try:
            with urllib.request.urlopen(CIFAR_URL, timeout=60) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 170498071)
                bar, done = Progress("download CIFAR-10", total // 2**20, "MiB"), 0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done // 2**20)
                bar.close()
        except OSError as error:
            raise DemoError(f"could not download {CIFAR_URL} ({error}); pass --data PATH to a "
                            "local copy (a cifar-10-batches-py folder or the .tar.gz)") from None
        if md5_of(tmp) != CIFAR_MD5:
            raise DemoError(f"downloaded {CIFAR_URL} but its MD5 is wrong (corrupt transfer); "
                            "run again")
    say(f"downloading CIFAR-10 (163 MiB) to {archive}")
    atomic_write(archive, fetch)
    return archive


def synthetic_images(n, seed=0):
    """Class-conditional stand-in for CIFAR-10 (tests, --quick): class k is a shape (k % 5: disc,
    square, ring, bar, cross) in a hue of its own, at a random place and size, on a random dark
    gradient. Learnable in seconds; NOT a benchmark."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i, k in enumerate(labels):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        dy, dx = yy - cy, xx - cx
        mask = [dy**2 + dx**2 < r**2, np.maximum(abs(dy), abs(dx)) < r * 0.8,
                abs(np.sqrt(dy**2 + dx**2) - r * 0.8) < 2, abs(dy) < r * 0.35,
                (abs(dy) < 2) | (abs(dx) < 2)][k % 5] & (abs(dy) < r) & (abs(dx) < r)
        hue = (k / 10 + np.array([0, 1 / 3, 2 / 3])) * 2 * np.pi
        color = 140 + 110 * np.cos(hue + rng.normal(0, 0.15))
        background = rng.uniform(0, 90, 3) * (0.5 + 0.5 * (yy / 31)[..., None])
        images[i] = np.where(mask[..., None], color, background).clip(0, 255)
    return images, labels.astype(np.int64)


def load_data(args):
    """(images uint8 (N, 32, 32, 3), labels (N,), description, identity hash)."""
    if args.data == "synthetic":
        images, labels = synthetic_images(args.n_images or 50000, args.seed)
        return images, labels, (f"SYNTHETIC shapes ({len(labels)} images; not CIFAR-10, numbers "
                                "not meaningful)"), digest(images.tobytes(), labels.tobytes())
    source = Path(args.data) if args.data else download_cifar(args.cache)
    images, labels = read_cifar(source)
    if args.data and source.name.endswith("gz") and source.is_file() and \
            md5_of(source) != CIFAR_MD5:
        say(f"note: {source} is not the official archive (MD5 differs); using it anyway")
    images, labels = images[:args.n_images], labels[:args.n_images]
    return (images, labels, f"CIFAR-10 train ({len(labels)} images, from {source})",
            digest(images.tobytes(), labels.tobytes()))


def load_test_images(args):
    """The first --heldout-n images of CIFAR-10's test split (never trained on), or synthetic ones
    drawn with a seed of their own."""
    if args.data == "synthetic":
        return synthetic_images(args.heldout_n, seed=1_000_003)
    source = Path(args.data) if args.data else download_cifar(args.cache)
    images, labels = read_cifar(source, "test")
    if len(images) < args.heldout_n:
        raise DemoError(f"--heldout-n {args.heldout_n}: the test split has {len(images)} images")
    return images[:args.heldout_n], labels[:args.heldout_n]


# =============================================================================================
# Stage 1: the VAE whose latents are what SiT denoises and SRA 2's target f_VAE
# =============================================================================================


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


def to_uint8(x):
    """float NCHW in [-1, 1] -> uint8 NHWC on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def train_vae(images, args, device):
    torch.manual_seed(VAE_SEED)
    vae = VAE(args.vae_width, args.latent_channels).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0)
    pixels = torch.from_numpy(images).to(device)                       # uint8 (N, 32, 32, 3)
    bar = Progress("stage 1: VAE", args.vae_steps)
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
def encode_all(vae, images, device, batch=1000):
    """Posterior means and standard deviations of every image and of its mirror image:
    2 x (2, N, C, 16, 16) float32 on the CPU."""
    out, bar = [[], [], [], []], Progress("stage 1: encoding", len(images), "img")
    for i in range(0, len(images), batch):
        x = to_float(torch.from_numpy(images[i:i + batch]).to(device))
        for flip in (0, 1):
            mean, logvar = vae.encode(x.flip(3) if flip else x)
            out[flip].append(mean.float().cpu())
            out[2 + flip].append((0.5 * logvar.float()).exp().cpu())
        bar.update(i + len(x))
    bar.close()
    pairs = [torch.stack([torch.cat(out[k]), torch.cat(out[k + 1])]) for k in (0, 2)]
    return pairs[0], pairs[1]


def stage1_path(args, data_id):
    settings = dict(width=args.vae_width, channels=args.latent_channels, kl=args.vae_kl,
                    lr=args.vae_lr, steps=args.vae_steps, batch=args.vae_batch, seed=VAE_SEED,
                    version=2)
    return Path(args.cache) / f"stage1-{digest(settings, data_id)}.pt", settings


def stage1(images, data_id, args, device):
    """The VAE, trained or from the cache, and the normalised latents (2 flips, N, C, 16, 16)."""
    path, settings = stage1_path(args, data_id)
    saved = read_cache(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    if saved is not None:
        say(f"stage 1: VAE and latents from the cache ({path.name})")
    else:
        tic = time.perf_counter()
        vae = train_vae(images, args, device)
        latents, stds = encode_all(vae, images, device)                # 2 x (2, N, C, 16, 16)
        # Normalised to mean 0, std 1 (the SD-VAE's 0.18215 is such a scale): the noise
        # eps ~ N(0, I) must be on the latents' scale, and the SRA 2 target inherits it.
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        saved = dict(vae={k: v.cpu() for k, v in vae.state_dict().items()}, settings=settings,
                     latents=((latents - shift) * scale).half(), std=(stds * scale).half(),
                     shift=shift, scale=scale,
                     raw_std=latents.std().item(), seconds=time.perf_counter() - tic)
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
        say(f"stage 1: VAE trained and {2 * len(images)} latents encoded in "
            f"{fmt_time(saved['seconds'])} (cached as {path.name})")
    vae = VAE(args.vae_width, args.latent_channels)
    vae.load_state_dict(saved["vae"])
    z = saved["latents"].float()
    say(f"        latents {tuple(z.shape[1:])} x 2 flips; raw std {saved['raw_std']:.3f}, "
        f"shift {saved['shift']:+.3f}, scale {saved['scale']:.4f} (std now {z.std():.3f})")
    return SimpleNamespace(vae=vae.to(device).eval().requires_grad_(False), latents=z,
                           std=saved["std"].float(),
                           shift=saved["shift"], scale=saved["scale"],
                           seconds=saved.get("seconds", 0.0))


@torch.no_grad()
def decode(stage, z):
    """Normalised latents (N, C, 16, 16) -> uint8 images (N, 32, 32, 3) on the CPU."""
    return to_uint8(stage.vae.decode(z.float() / stage.scale + stage.shift))


# =============================================================================================
# Stage 2: one training run (the baseline when run.align is False)
# =============================================================================================


@dataclasses.dataclass
class Run:
    """One stage-2 run: its name (files), label (tables) and SRA 2 settings."""
    name: str
    label: str
    align: bool
    align_depth: int
    align_loss: str
    lam: float
    t_range: tuple
    mlp_depth: int
    mlp_width: int
    target_scale: float
    target: str                                      # "mean" or "sample" of the VAE posterior
    settings: str = ""                               # the SRA 2 settings in words


def make_run(args, name, label, align, **changes):
    run = Run(name, label, align, args.align_depth, args.align_loss, args.lam,
              tuple(args.t_range), args.mlp_depth, args.mlp_width, args.target_scale,
              args.target)
    run = dataclasses.replace(run, **changes)
    width = f"width {run.mlp_width}" if run.mlp_width else "width 2D"
    scale = f", target x {run.target_scale:g}" if run.target_scale != 1 else ""
    scale += ", target a posterior sample" if run.target == "sample" else ""
    run.settings = "vanilla" if not align else (
        f"block {run.align_depth}, {run.align_loss}, lambda {run.lam:g}, t in [{run.t_range[0]:g}, "
        f"{run.t_range[1]:g}], {run.mlp_depth}-layer MLP of {width}{scale}")
    return run


def ablation_runs(args, depth):
    """(group, setting, run) rows of Table 1; the default SRA 2 run appears once per group."""
    d0 = args.align_depth
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


def model_config(args):
    """(preset, overrides, the SiTConfig the run builds), without building it."""
    preset, overrides = DEMO_MODELS.get(args.model, (args.model, {}))
    overrides = {**overrides, **dict(input_size=16, in_channels=args.latent_channels,
                                     num_classes=10)}
    return preset, overrides, sra2.SiTConfig(**{**sra2.PRESETS[preset], **overrides})


def build(args, run, device):
    preset, overrides, _ = model_config(args)
    torch.manual_seed(args.seed)                                       # same SiT init in every run
    model = sra2.create_sit(preset, **overrides).to(device)
    projector = (sra2.make_projector(model, depth=run.mlp_depth, width=run.mlp_width).to(device)
                 if run.align else None)
    return model, projector


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
    drop = torch.rand(shape[0], generator=generator, device=generator.device) < drop_prob
    return t, eps, drop


def new_record(run, args, model, projector):
    """A run's record, a plain dict (checkpoints hold it, results.json lists it, less the grids):
    name, label, seed, settings   which run; settings: its SRA 2 settings in words
    params, projector_params      parameter counts of SiT and P (0 for the baseline)
    log       [{step, loss, denoise, align, grad_norm, wall}], means over --log-every steps
    heldout   [{step, wall, loss, low, middle, high}] at the held-out checkpoints
    evals     [{step, wall, fid}] at the FID checkpoints; grids {step: its first 100 images}
    wall, heldout_seconds, clipped   train time (s), held-out time (s), steps above the clip
    final_fid, final_grid   added when the run ends (final_fid is None without a final FID);
                            a record with final_fid is a finished run."""
    return dict(name=run.name, label=run.label, seed=args.seed, settings=run.settings,
                params=sum(p.numel() for p in model.parameters()),
                projector_params=sum(p.numel() for p in projector.parameters()) if projector else 0,
                log=[], heldout=[], evals=[], grids={}, wall=0.0, heldout_seconds=0.0, clipped=0)


def train_run(run, stage, labels, args, device, fid_meter, out):
    """Train one run for args.steps (with --resume, from its checkpoint on), measuring the held-out
    loss and FID at their checkpoints; returns its record. Every rank runs it; rank 0 saves."""
    rank, world = rank_and_world()
    model, projector = build(args, run, device)
    ema = sra2.create_ema(model)
    sit_params = [p for p in model.parameters() if p.requires_grad]
    params = sit_params + list(projector.parameters() if projector else [])
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0,
                            fused=device.type == "cuda")
    # Clipping SiT and P as one vector (REPA) lets a large alignment gradient shrink the
    # denoising update too; "separate" clips each alone; "none" still measures the norm.
    groups = [g for g in ([sit_params, params[len(sit_params):]] if args.clip == "separate"
                          else [params]) if g]
    limit = math.inf if args.clip == "none" else args.grad_clip
    rec, path, start = new_record(run, args, model, projector), ckpt_path(args, out, run), 0
    if args.resume and path.is_file():                         # checked before any work (main)
        start, rec = restore(load_checkpoint(path, args, run), model, ema, projector, opt, rec)
        say(f"{run.label}: " + ("finished; its record is reused" if "final_fid" in rec
                                else f"resumed at step {start}") + f" ({path})")
        if "final_fid" in rec:
            return rec
    net, proj = data_parallel(model, device), data_parallel(projector, device)
    forward = torch.compile(net) if args.compile else net
    latents, labels = stage.latents.to(device), torch.as_tensor(labels).to(device)
    stds = stage.std.to(device) if proj and run.target == "sample" else None
    due = lambda count: {round(args.steps * (i + 1) / count) for i in range(count)}
    eval_steps, heldout_steps = due(args.evals), due(args.heldout_evals)
    generator, mine = torch.Generator(device), slice(rank, None, world)  # this rank's share
    sums = torch.zeros(5, device=device)                   # loss, denoise, align, norm, clipped
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    last_log, saved, last_save = start, start or None, time.perf_counter()
    bar, tic = Progress(f"stage 2: {run.label}", args.steps), time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        idx, flip = batch_indices(step - 1, len(labels), args.batch_size, args.seed, device)
        t, eps, drop = step_noise(generator, args.seed, step, (args.batch_size, *latents.shape[2:]),
                                  model.config.class_dropout_prob)
        idx, flip, t, eps, drop = idx[mine], flip[mine], t[mine], eps[mine], drop[mine]
        z, y = latents[flip, idx], labels[idx]                 # (B / world, C, 16, 16), (B / world)
        goal = z if stds is None else z + stds[flip, idx] * torch.randn(       # z ~ q(z | x),
            (args.batch_size, *z.shape[1:]), generator=generator, device=device)[mine]  # drawn
        # after step_noise's draws, so t, eps and the dropped labels stay those of the baseline
        target = sra2.patchify(goal, model.config.patch_size) * run.target_scale if proj else None
        with sra2.autocast(device, enabled=device.type == "cuda"):
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
            sync_time(device, tic)
            tic = time.perf_counter()
        ckpt_due = args.ckpt_every > 0 and step % args.ckpt_every == 0
        if step % args.log_every and step not in eval_steps | heldout_steps and not ckpt_due:
            continue                                           # one host sync per log line
        if world > 1:                                          # the global batch's numbers
            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        loss, denoise, align, norm, clipped = (sums / (world * (step - last_log))).tolist()
        rec["clipped"] += round(clipped * (step - last_log))
        sums.zero_()
        if first_bad:                                          # stop before a checkpoint saves it
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            kept = f"the last good checkpoint, step {saved}, is kept: {path}" if saved else \
                "no checkpoint yet"
            raise DemoError(f"{run.label}: {what} at step {first_bad.item()}; stopping ({kept})")
        rec["wall"], last_log = rec["wall"] + sync_time(device, tic), step
        rec["log"].append(dict(step=step, loss=loss, denoise=denoise, align=align, grad_norm=norm,
                               wall=rec["wall"]))
        bar.update(step, f"loss {loss:.4f} (denoise {denoise:.4f}, align {align:.4f})",
                   elapsed=rec["wall"])
        if step in heldout_steps:
            tic = time.perf_counter()
            rec["heldout"].append(dict(step=step, wall=rec["wall"],
                                       **heldout_loss(ema, stage.heldout)))
            rec["heldout_seconds"] += sync_time(device, tic)
        if step in eval_steps:
            bar.close()
            evaluate(ema, stage, args, device, fid_meter, rec, step, run.label)
        minutes = (time.perf_counter() - last_save) / 60
        if rank == 0 and (ckpt_due or 0 < args.ckpt_minutes < minutes):
            save_checkpoint(path, model, ema, projector, opt, step, args, run, rec)
            saved, last_save = step, time.perf_counter()
        tic = time.perf_counter()                              # evaluations and saves don't count
    bar.close()
    rec["final_fid"] = None                                    # the key marks a finished run
    if args.final_fid_n:
        images = generate(ema, stage, args.final_fid_n, args.final_sampling_steps, args, device,
                          f"{run.label} final")
        rec.update(final_fid=from_rank0(fid_meter, images), final_grid=images[:100])
    if rank == 0 and (args.ckpt_minutes > 0 or args.ckpt_every > 0):   # the finished run
        save_checkpoint(path, model, ema, projector, opt, args.steps, args, run, rec)
    return rec


# =============================================================================================
# Measure: the held-out loss and FID
# =============================================================================================


@torch.no_grad()
def heldout_set(args, stage, device):
    """--heldout-n test images encoded by the stage-1 VAE (posterior means, normalised like the
    training latents), image i at t = (j + 0.5) / HELDOUT_T with j = i mod HELDOUT_T, and one
    fixed noise draw: every run, seed and checkpoint is judged on the same (z, y, t, eps)."""
    images, labels = load_test_images(args)
    z = torch.cat([stage.vae.encode(to_float(torch.from_numpy(b).to(device)))[0].float()
                   for b in np.array_split(images, max(1, len(images) // 500))])   # (n, C, 16, 16)
    z = (z - stage.shift) * stage.scale
    grid = (torch.arange(HELDOUT_T, dtype=torch.float64) + 0.5) / HELDOUT_T
    t = grid[torch.arange(len(z)) % HELDOUT_T].float()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED))
    return SimpleNamespace(z=z, y=torch.as_tensor(labels).to(device), t=t.to(device),
                           eps=eps.to(device))


@torch.no_grad()
def heldout_loss(model, held, batch=100):
    """The denoising term on the held-out set, |v_theta(x_t, t, y) - v|^2 with v = eps - z, mean
    over C, H, W and images; overall and per band of t (low t: little noise). Labels always given
    (eval mode), float32 without autocast (TF32 matmuls on CUDA, as in training)."""
    per_image = []
    with torch.autocast(held.z.device.type, enabled=False):
        for z, y, t, eps in zip(*(v.split(batch) for v in (held.z, held.y, held.t, held.eps))):
            x_t, v_target = sra2.interpolate(z, eps, t)                # x_t = (1 - t) z + t eps
            per_image.append((model(x_t, t, y).float() - v_target).square().mean((1, 2, 3)))
    per_image = torch.cat(per_image)                                   # (n,)
    bands = {name: per_image[(held.t >= lo) & (held.t < hi)].mean().item()
             for name, (lo, hi) in HELDOUT_BANDS.items()}
    return dict(loss=per_image.mean().item(), **bands)


def fid_small(features, mu_ref, sigma_ref):
    """Exact FID of few (n) generated images without a D x D covariance: S_gen = B^T B with
    B = (F - mu) / sqrt(n - 1) and S_ref = C C^T (fid.psd_factor), so tr((S_ref S_gen)^1/2) is the
    sum of the singular values of B C (n, R), with no square roots of rounding noise."""
    features = np.asarray(features, np.float64)
    n, mu = len(features), features.mean(0)
    B = (features - mu) / math.sqrt(n - 1)                             # (n, D)
    tr_covmean = np.linalg.svd(B @ fid.psd_factor(sigma_ref, "sigma_ref"), compute_uv=False).sum()
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma_ref) + (B * B).sum() - 2 * tr_covmean)


def load_inception(args, device):
    try:                                                   # fid.py names a file that is no weights
        return fid.load_inception(args.inception, device)
    except ValueError as error:
        raise DemoError(f"--inception {error}") from None


def reference_path(args, data_id, n_ref):
    weights = Path(args.inception) if args.inception else None
    key = digest(data_id, n_ref, "tf", weights.name if weights else "default",
                 weights.stat().st_size if weights else 0)
    return Path(args.cache) / f"fid-ref-{key}.npz"


class FIDMeter:
    """FID of uint8 images against the (cached) Inception statistics of the training images."""

    def __init__(self, args, images, data_id, device):
        self.device, self.n_ref = device, min(args.fid_ref_n, len(images))
        self.model = load_inception(args, device)
        path = reference_path(args, data_id, self.n_ref)
        cached = read_cache(path, lambda: fid.load_statistics(path))
        if cached is not None:
            self.mu, self.sigma = cached
        else:
            say(f"FID reference: Inception statistics of {self.n_ref} training images (cached)")
            self.mu, self.sigma = self.statistics(images[:self.n_ref])
            atomic_write(path, lambda tmp: fid.save_statistics(tmp, self.mu, self.sigma, "tf"))

    def statistics(self, images):
        """(mu, sigma) from fid.compute_statistics on a stream of batches small enough that the
        progress line moves every few seconds on a CPU."""
        batch = 500 if self.device.type == "cuda" else 50
        bar = Progress("  Inception", len(images), "img")

        def batches():
            for i in range(0, len(images), batch):
                yield images[i:i + batch]
                bar.update(min(i + batch, len(images)))
        mu_sigma = fid.compute_statistics(batches(), self.model, batch_size=200, device=self.device)
        bar.close()
        return mu_sigma

    @torch.no_grad()
    def features(self, images):
        """Pool3 features (n, 2048), preprocessed exactly as fid.compute_statistics does."""
        with torch.autocast(self.device.type, enabled=False):
            return torch.cat([self.model(fid.preprocess(b.to(self.device), "tf"))[0].double().cpu()
                              for b in torch.as_tensor(images).split(64)]).numpy()

    def __call__(self, images):
        if len(images) > SMALL_FID:
            mu_sigma = self.statistics(torch.as_tensor(images))
            return fid.frechet_distance(self.mu, self.sigma, *mu_sigma)
        return fid_small(self.features(images), self.mu, self.sigma)


@torch.no_grad()
def generate(model, stage, n, num_steps, args, device, label):
    """n images (uint8 NHWC) from the papers' Euler-Maruyama SDE, no CFG; image i has class i % 10.
    Chunk c's noise comes from a generator seeded by (seed, c): matched across runs and steps, and
    the same when torchrun's rank r samples chunks r, r + world, ... (all ranks get all n)."""
    rank, world = rank_and_world()
    chunks = list(enumerate((torch.arange(n, device=device) % 10).split(args.sample_batch)))
    mine = chunks[rank::world]
    done, bar = [], Progress(f"  sampling {label}", sum(len(y) for _, y in mine), "img")
    for chunk, y in mine:
        generator = torch.Generator(device).manual_seed(10_007 * (args.seed + 1) + chunk)
        noise = torch.randn(len(y), args.latent_channels, 16, 16, generator=generator,
                            device=device)
        with sra2.autocast(device, enabled=device.type == "cuda"):
            z = sra2.sample_sde(model, noise, y, num_steps=num_steps, generator=generator)
        done.append((chunk, decode(stage, z)))
        bar.update(sum(len(images) for _, images in done))
    bar.close()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, done)                         # CPU uint8 images, small
        done = sorted((part for parts in gathered for part in parts), key=lambda part: part[0])
    return torch.cat([images for _, images in done])


def evaluate(ema, stage, args, device, fid_meter, rec, step, label):
    """A point of the FID curve: args.fid_n samples of the EMA model, their FID and grid."""
    images = generate(ema, stage, args.fid_n, args.fid_sampling_steps, args, device,
                      f"{label} @ {step}")
    rec["evals"].append(dict(step=step, wall=rec["wall"], fid=from_rank0(fid_meter, images)))
    rec["grids"][step] = images[:100]
    say(f"  {label} step {step}: {args.ckpt_fid} {rec['evals'][-1]['fid']:.2f}  "
        f"(train time {fmt_time(rec['wall'])}, {step / rec['wall']:.1f} it/s)")


def reach(xs, fids, target):
    """(x from which the curve, linear between checkpoints, stays at FID <= target to its end,
    exact): the last crossing counts, since a noisy curve can dip below and come back up. x is
    None if it ends above; exact is False when it is below from the first checkpoint on."""
    if fids[-1] > target:
        return None, True
    above = [i for i, f in enumerate(fids) if f > target]
    if not above:
        return xs[0], False
    i = above[-1]                                                      # last checkpoint above
    (xa, fa), (xb, fb) = (xs[i], fids[i]), (xs[i + 1], fids[i + 1])
    return xa + (xb - xa) * (fa - target) / (fa - fb), True


# =============================================================================================
# Tables and pictures
# =============================================================================================


def table(headers, rows):
    """Plain-text table, columns padded to their widest cell."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]


def mean(values):
    values = list(values)
    return None if None in values else sum(values) / len(values)


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def speedup_lines(base, sra, args):
    """The headline: the fraction of steps and of wall time SRA 2 needs for the baseline's final
    FID. Returns (lines, fraction of steps or None)."""
    steps, sra_fid = [e["step"] for e in base["evals"]], [e["fid"] for e in sra["evals"]]
    target = base["evals"][-1]["fid"]
    head = (f"speed-up ({args.ckpt_fid} curve, seed {base['seed']}): the baseline ends at FID "
            f"{target:.2f} after {steps[-1]} steps;")
    x, exact = reach(steps, sra_fid, target)
    if x is None:
        return [head, f"  SRA 2 does NOT end at or below it (its final: {sra_fid[-1]:.2f}, best: "
                      f"{min(sra_fid):.2f}): no speed-up at this scale and length"], None
    wall, _ = reach([e["wall"] for e in sra["evals"]], sra_fid, target)
    share = (f"at step {x:.0f}: {x / steps[-1]:.2f} of the steps ({steps[-1] / x:.2f}x fewer);"
             if exact else f"already at its first checkpoint, step {x:.0f}: at most "
             f"{x / steps[-1]:.2f} of the steps (a bound, not a measurement);")
    return [head, f"  SRA 2 reaches it {share}", f"  in wall-clock {fmt_time(wall)} against the "
            f"baseline's {fmt_time(base['wall'])} ({wall / base['wall']:.2f})"], x / steps[-1]


def mean_record(recs):
    """The seeds' average run: every number of log, held-out and FID curves, checkpoint by
    checkpoint."""
    average = lambda rows: [{k: es[0][k] if k == "step" else mean(e[k] for e in es) for k in es[0]}
                            for es in zip(*rows)]
    return dict(recs[0], seed="mean", label=recs[0]["label"] + " (mean)",
                wall=mean(r["wall"] for r in recs),
                final_fid=mean(r.get("final_fid") for r in recs),
                **{key: average([r[key] for r in recs]) for key in ("log", "heldout", "evals")})


def result_lines(args, runs, records, floor):
    """Table 2 (or Table 1 with --ablate), the held-out loss, clipping and the speed-up."""
    names = [run.name for _, _, run in runs]
    seeds = args.seeds + (["mean"] if len(args.seeds) > 1 else [])
    records = {**records, **{(name, "mean"): mean_record([records[name, x] for x in args.seeds])
                             for name in names if len(args.seeds) > 1}}
    last = lambda r, key, field: r[key][-1][field] if r[key] else None
    row = lambda r: [fmt(last(r, "evals", "fid")), fmt(r["final_fid"]),
                     fmt(last(r, "log", "denoise"), ".4f"),
                     fmt(last(r, "log", "align"), ".4f") if r["projector_params"] else "-"]
    heads = [args.ckpt_fid, args.final_fid, "denoise", "align"]
    if args.ablate:
        rows = [[group, setting, *row(records[run.name, seeds[-1]]),
                 f"{args.steps / records[run.name, seeds[-1]]['wall']:.1f}"]
                for group, setting, run in runs]
        return [f"Table 1 in miniature ({args.model}, {args.steps} steps, mean over seeds "
                f"{args.seeds})"] + table(["design", "setting", *heads, "it/s"], rows), {}
    rows = [[records[name, seed]["label"], f"{records[name, seed]['params'] / 1e6:.1f}M", seed,
             fmt_time(records[name, seed]["wall"]), *row(records[name, seed])]
            for seed in seeds for name in names]
    if floor["ckpt"] is not None or floor["final"] is not None:
        rows.append(["VAE reconstruction floor", "", "", "", fmt(floor["ckpt"]),
                     fmt(floor["final"]), "", ""])
    lines = ["Table 2 in miniature (no CFG; P is dropped at inference, so both sample with the "
             f"same SiT; {args.steps} steps)"] + table(["model", "params", "seed", "train time",
                                                        *heads], rows)
    speedups = {}
    for seed in seeds:
        recs = [records[name, seed] for name in names]
        if args.heldout_evals:
            both = len(recs) == 2
            gap = lambda e: [f"{100 * (e[1] / e[0] - 1):+.2f}%"] if both else []
            rows = [[es[0]["step"], *(f"{e['loss']:.4f}" for e in es),
                     *gap([e["loss"] for e in es])] for es in zip(*(r["heldout"] for r in recs))]
            rows += [[f"  t band {band}", *(f"{r['heldout'][-1][band]:.4f}" for r in recs),
                      *gap([r["heldout"][-1][band] for r in recs])] for band in HELDOUT_BANDS]
            lines += ["", f"held-out loss (denoising term on {args.heldout_n} test images, fixed t "
                      f"grid and noise, EMA weights), seed {seed}"]
            lines += table(["step", *(r["label"] for r in recs), *(["SRA 2 - baseline"] * both)],
                           rows)
        if names != ["baseline", "sra2"]:
            continue
        base, sra = recs
        if seed != "mean":
            lines += ["", f"time per step: SRA 2 {100 * (sra['wall'] / base['wall'] - 1):+.1f}% "
                      f"against the baseline, seed {seed} (the first step is not timed)",
                      f"gradient norm above the clip {args.grad_clip:g} ({args.clip} clipping): "
                      f"baseline {base['clipped']}, SRA 2 {sra['clipped']} of {args.steps} steps"]
        if args.evals:
            lines += ["", f"{args.ckpt_fid} at the checkpoints, seed {seed}"] + table(
                ["step", "baseline FID", "train time", "SRA 2 FID", "train time"],
                [[b["step"], f"{b['fid']:.2f}", fmt_time(b["wall"]), f"{a['fid']:.2f}",
                  fmt_time(a["wall"])] for b, a in zip(base["evals"], sra["evals"])])
            text, speedups[str(seed)] = speedup_lines(base, sra, args)
            lines += [""] + text
    return lines, speedups


def pictures(args, records, names, out, quick):
    """The charts of every run, and the matched sample grids of the first seed."""
    runs = [records[name, seed] for seed in args.seeds for name in names]
    tag = lambda r: r["label"] + (f" (seed {r['seed']})" if len(args.seeds) > 1 else "")
    curve = lambda r, key, x, y, what="": (tag(r) + what, [e[x] for e in r[key]],
                                           [e[y] for e in r[key]])
    fid_title = f"{args.ckpt_fid} (SDE, EMA) of {args.model} on 16x16x{args.latent_channels}"
    terms = lambda r: ("denoise", "align") if r["projector_params"] else ("denoise",)
    charts = [("loss_curves.png", [curve(r, "log", "step", term, f": {term}") for r in runs
                                   for term in terms(r)],
               f"training losses (mean over {args.log_every} steps)", "training steps", "loss")]
    if args.evals:
        charts += [(f"fid_vs_{x}.png", [curve(r, "evals", key, "fid") for r in runs],
                    fid_title, label, "FID") for x, key, label in (
            ("steps", "step", "training steps"),
            ("time", "wall", "training wall-clock (s, evaluations excluded)"))]
    if args.heldout_evals:
        charts.append(("heldout_loss.png", [curve(r, "heldout", "step", "loss") for r in runs],
                       f"held-out denoising loss, {args.heldout_n} test images (EMA)",
                       "training steps", "loss"))
    for name, series, title, xlabel, ylabel in charts:
        line_chart(out / name, series, title, xlabel, f"{ylabel} (log scale)", logy=True,
                   note=quick)
    if names != ["baseline", "sra2"]:
        return
    base, sra = records["baseline", args.seeds[0]], records["sra2", args.seeds[0]]
    tail = f"  [{quick}]" if quick else ""
    for b, a in zip(base["evals"], sra["evals"]):
        panels(out / f"samples_step{b['step']:06d}.png",
               [(f"baseline, {args.ckpt_fid} {b['fid']:.1f}", base["grids"][b["step"]]),
                (f"SRA 2, {args.ckpt_fid} {a['fid']:.1f}", sra["grids"][a["step"]])],
               f"step {b['step']}: same noise, same labels (image i has class i % 10){tail}")
    if args.final_fid_n:
        panels(out / "samples_final.png",
               [(f"baseline, {args.final_fid} {base['final_fid']:.1f}", base["final_grid"]),
                (f"SRA 2, {args.final_fid} {sra['final_fid']:.1f}", sra["final_grid"])],
               f"step {args.steps}, {args.final_sampling_steps}-step SDE{tail}")


# =============================================================================================
# Main: settings, data, stage 1, both runs per seed, tables, pictures, results.json
# =============================================================================================


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        check(args)
        device, out, card = setup(args)
        records = demo(args, device, out, card)
        if dist.is_initialized():
            dist.barrier()                                     # no rank leaves while another talks
        return records
    except (DemoError, FileNotFoundError) as error:            # FileNotFound: Inception weights
        if os.environ.get("RANK", "0") == "0":                 # every rank fails alike; one says so
            print("tiny_demo: error: " + " ".join(str(error).split()), file=sys.stderr)
        raise SystemExit(2)
    finally:
        global LOG_FILE
        LOG_FILE = None
        torch.set_num_threads(threads)                         # main() may be called in-process
        if dist.is_initialized():
            dist.destroy_process_group()


def demo(args, device, out, card):
    t_start, rank = time.perf_counter(), rank_and_world()[0]
    quick = "QUICK MODE (smoke test: tiny settings, numbers NOT meaningful)" if args.quick else None
    images, labels, data_desc, data_id = rank0_first(load_data, args)      # rank 0 downloads
    args.data_id = data_id                                    # a resumed run must see the same data
    args.fid_ref_n = min(args.fid_ref_n, len(labels))         # what the reference really holds
    if args.batch_size > len(labels):
        raise DemoError(f"--batch-size {args.batch_size} is more than the {len(labels)} training "
                        "images")
    runs = ablation_runs(args, model_config(args)[2].depth) if args.ablate else [
        ("", "", make_run(args, name, label, name == "sra2")) for name, label in
        (("baseline", args.model), ("sra2", f"{args.model} + SRA 2")) if name in args.runs]
    check_checkpoints(args, runs, out)                        # before any work or any write
    say(f"tiny_demo on {card}: {data_desc}" + (f"\n{quick}" if quick else ""), describe(args))
    uses_fid = args.evals > 0 or args.final_fid_n > 0
    if device.type == "cpu" and not args.quick and rank == 0:
        say(estimate(args, device, runs, data_id, uses_fid))
    fid_meter = FIDMeter(args, images, data_id, device) if rank == 0 and uses_fid else None
    stage = rank0_first(stage1, images, data_id, args, device)         # rank 0 trains it
    stage.heldout = heldout_set(args, stage, device) if args.heldout_evals else None
    # The floor: FIDs of decoded real latents, i.e. of a perfect diffusion model behind the decoder.
    n_floor = max(args.fid_n if args.evals else 2, args.final_fid_n, min(50, len(images)))
    recon = torch.cat([decode(stage, z.to(device))
                       for z in stage.latents[0, :n_floor].split(args.sample_batch)])
    floor = {key: from_rank0(fid_meter, recon[:n]) if n else None
             for key, n in (("ckpt", args.fid_n if args.evals else 0), ("final", args.final_fid_n))}
    if rank == 0:
        panels(out / "vae_reconstructions.png", [("real", images[:50]),
                                                 ("VAE reconstruction", recon[:50])],
               f"stage 1: VAE 32x32x3 -> 16x16x{args.latent_channels} -> 32x32x3"
               + (f"  [{quick}]" if quick else ""))
    if uses_fid:                                              # no sampler: named by image count
        say("VAE reconstruction floor: " + ", ".join(
            f"{fid_name(n)} {floor[key]:.2f}" for key, n in (("ckpt", args.fid_n),
                                                             ("final", args.final_fid_n))
            if floor[key] is not None))
    records = {}                                              # (run name, seed) -> record
    for args.seed in args.seeds:
        for _, _, run in runs:
            if (run.name, args.seed) not in records:
                records[run.name, args.seed] = train_run(run, stage, labels, args, device,
                                                         fid_meter, out)
    args.seed = args.seeds[0]
    if rank == 0:
        report(args, runs, records, floor, stage, out, card, data_desc, quick,
               time.perf_counter() - t_start)
    return records


def report(args, runs, records, floor, stage, out, card, data_desc, quick, total_seconds):
    """Print and save the tables (table.txt), every number (results.json) and the pictures."""
    names = [run.name for _, _, run in runs]
    lines = [f"tiny_demo results, {time.strftime('%Y-%m-%d %H:%M')}, on {card}"] + (
        [quick] if quick else []) + [
        f"data: {data_desc}", describe(args),
        f"SRA 2: {make_run(args, 'sra2', '', True).settings}",
        f"stage 1: VAE width {args.vae_width}, {args.latent_channels} latent channels, KL "
        f"{args.vae_kl:g}, {args.vae_steps} steps of batch {args.vae_batch}, lr {args.vae_lr:g}",
        f"FID: EMA weights, no CFG, against {args.fid_ref_n} training images, tf convention", ""]
    runs_json = [{k: v for k, v in r.items() if k not in ("grids", "final_grid")}
                 for r in records.values()]
    text, speedups = result_lines(args, runs, records, floor)
    lines += text + ["", f"total wall time {fmt_time(total_seconds)} (stage 1 took "
                     f"{fmt_time(stage.seconds)} when it was not cached)"]
    if not args.ablate:
        pictures(args, records, names, out, quick)
    say("", *lines)
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    results = dict(settings=vars(args), card=card, machine=machine(), data=data_desc, floor=floor,
                   total_seconds=total_seconds, step_fraction_to_baseline_fid=speedups,
                   runs=runs_json)
    atomic_write(out / "results.json",
                lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=str)))


def setup(args):
    """Device (sra2.pick_device), torchrun's process group, threads, output folder and log."""
    global LOG_FILE
    try:
        device = sra2.pick_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise DemoError(f"--device {args.device}: {error}") from None
    if torchrun_world() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a GPU each
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise DemoError(f"torchrun on {device.type}: use CUDA (NCCL) or --device cpu (gloo)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads is not None and device.type == "cpu":
        torch.set_num_threads(args.threads)      # OpenMP threads spin-wait: few for small ops
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")             # TF32 outside autocast
        torch.backends.cudnn.benchmark = True
    rank, world = rank_and_world()
    out = Path(args.out)
    try:
        if rank == 0:                                          # the other ranks write nothing
            out.mkdir(parents=True, exist_ok=True)
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot create --out/--cache folder ({error})") from None
    if rank == 0:                                         # each run's log starts with its command
        LOG_FILE = out / "log.txt"
        with open(LOG_FILE, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: tiny_demo.py "
                    f"{' '.join(args.argv)}\n")
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return device, out, card + (f" x {world} processes (DDP)" if world > 1 else "")


def estimate(args, device, runs, data_id, uses_fid):
    """The run's time on this CPU, from timed steps of each part scaled by the settings."""
    def seconds(fn, n):                        # per image: the best of 2 calls after a warm-up
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return min(times[1:]) / n
    b, n_runs = min(args.batch_size, 64), len({run.name for _, _, run in runs}) * len(args.seeds)
    model, projector = build(args, make_run(args, "sra2", "", True), device)
    z, y = torch.randn(b, args.latent_channels, 16, 16), torch.zeros(b, dtype=torch.long)
    sit = seconds(lambda: sra2.training_loss(model, z, y, projector, align_depth=args.align_depth)
                  ["loss"].backward(), b)                      # forward + backward, one image
    vae = VAE(args.vae_width, args.latent_channels)
    vae_step = seconds(lambda: vae.decode(vae.encode(torch.zeros(b, 3, 32, 32))[0]).mean()
                       .backward(), b) * args.vae_batch
    net = load_inception(args, device) if uses_fid else None     # fails here without weights
    inception = seconds(lambda: net(fid.preprocess(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))),
                        4) if uses_fid else 0
    sampled = args.evals * args.fid_n * args.fid_sampling_steps + args.final_fid_n * \
        args.final_sampling_steps + args.heldout_evals * args.heldout_n
    per_run = (args.steps * args.batch_size + sampled / 3) * sit + inception * (
        args.evals * args.fid_n + args.final_fid_n)
    parts = {"stage 1": 0 if stage1_path(args, data_id)[0].is_file() else args.vae_steps * vae_step,
             "FID reference": 0 if not uses_fid or reference_path(args, data_id, args.fid_ref_n)
             .is_file() else args.fid_ref_n * inception,
             f"{n_runs} runs": n_runs * per_run}
    total = sum(parts.values())
    return (("note: a long run on a CPU: " if total > 1800 else "") + f"about {fmt_time(total)} "
            "here (" + ", ".join(f"{k} {fmt_time(v)}" for k, v in parts.items() if v) +
            "; from timed steps of each part)" + ("; --preset cpu is made for two cores"
                                     if args.preset == "full" else ""))


# =============================================================================================
# Infrastructure: checkpoints and resume, DDP helpers, chart drawing, small utilities
# =============================================================================================

CKPT_FORMAT = "tiny_demo/2"                # /1: before the held-out loss and the study knobs
CKPT_KEYS = {"format", "step", "settings", "run", "model", "ema", "projector", "optimizer", "rng",
             "record"}
# Settings a resumed run may change: where files are, how fast it runs, how often it saves. Any
# other difference would make it a different run.
RESUME_FREE = {"out", "cache", "data", "inception", "device", "threads", "compile", "resume",
               "ckpt_minutes", "ckpt_every", "runs", "preset", "argv", "seed", "seeds", "quick",
               "ablate", "ckpt_fid", "final_fid"}


def ckpt_path(args, out, run):
    """out/ckpt/<run>.pt; with several seeds, <run>-seed<k>.pt."""
    several = len(args.seeds) > 1
    return Path(out) / "ckpt" / (f"{run.name}-seed{args.seed}.pt" if several else f"{run.name}.pt")


def save_checkpoint(path, model, ema, projector, opt, step, args, run, rec):
    """Everything a resume needs as plain tensors and values (torch.load(weights_only=True));
    the data position is `step` itself. Saved right after a log line: no loss is half summed."""
    state = dict(format=CKPT_FORMAT, step=step, settings=vars(args), run=dataclasses.asdict(run),
                 model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                 projector=projector.state_dict() if projector is not None else {},
                 rng=dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all()
                          if torch.cuda.is_available() else []), record=rec)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, args, run, mmap=False):
    """The checkpoint at `path`, checked to be this run's (the one place that compares saved
    settings with the current ones), else one clear line. Nothing is written or moved here."""
    fix = "nothing was changed; move it away to start this run over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:                                 # torn, not torch, doctored
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise DemoError(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}: "
                        f"{reason}); {fix}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT or CKPT_KEYS - set(ckpt):
        raise DemoError(f"--resume: {path} is not a {CKPT_FORMAT} checkpoint; {fix}")
    show = lambda value: json.dumps(value, sort_keys=True, default=str)
    then = {**ckpt["settings"], "run": ckpt["run"]}
    now = {**vars(args), "run": dataclasses.asdict(run)}
    changed = [k for k in sorted(set(then) | set(now))
               if k not in RESUME_FREE and show(then.get(k)) != show(now.get(k))]
    changed += ["seed"] if ckpt["record"].get("seed") != args.seed else []
    if changed:
        name = lambda k: {"data_id": "the training data", "run": "the run's SRA 2 settings"}.get(
            k, "--" + k.replace("_", "-"))
        diffs = "; ".join(f"{name(k)}: {show(then.get(k, ckpt['record'].get(k)))} there, "
                          f"{show(now.get(k))} now" for k in changed[:3])
        raise DemoError(f"--resume: {path} is from another run ({diffs}); {fix}, or resume with "
                        "its settings")
    return ckpt


def restore(ckpt, model, ema, projector, opt, rec):
    """Load a checked checkpoint into the freshly built run. Returns (step, record)."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if projector is not None:
        projector.load_state_dict(ckpt["projector"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["cpu"])                    # unused by training (keyed draws)
    if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], {**rec, **ckpt["record"]}


def check_checkpoints(args, runs, out):
    """Before any work. --resume: every checkpoint there must be readable and this run's.
    Without it: an unfinished run's checkpoint is never overwritten by a fresh start."""
    found = []
    for args.seed in args.seeds:
        for path, run in ((ckpt_path(args, out, run), run) for _, _, run in runs):
            if path.is_file() and args.resume:
                found.append(load_checkpoint(path, args, run, mmap=True)["step"])
            elif path.is_file():
                try:
                    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception:                              # unreadable: nothing to lose
                    continue
                if "final_fid" not in ckpt["record"]:
                    raise DemoError(f"{path} holds an unfinished run (step {ckpt['step']} of "
                                    f"{ckpt['settings'].get('steps')}): pass --resume to continue "
                                    "it, or move it away to start over")
    args.seed = args.seeds[0]
    if args.resume and not found:
        say(f"--resume: no checkpoint in {Path(out) / 'ckpt'}; starting from scratch")


def torchrun_world():
    return int(os.environ.get("WORLD_SIZE", "1"))             # set by torchrun


def rank_and_world():
    """(rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank0_first(fn, *args):
    """fn(*args) on rank 0 first (it downloads, trains stage 1, writes the cache), then on the
    others, which find the cache. A rank 0 that fails still releases the others (finally)."""
    rank, world = rank_and_world()
    if rank > 0:
        dist.barrier()
    try:
        return fn(*args)
    finally:
        if rank == 0 and world > 1:
            dist.barrier()


def from_rank0(fn, *args):
    """fn(*args) on rank 0 only (one Inception, not one per GPU), its value sent to every rank."""
    rank, world = rank_and_world()
    value = [fn(*args) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def data_parallel(module, device):
    """Under torchrun, DDP: every rank starts from rank 0's weights and gradients are averaged.
    SiT and P get a wrapper each (training_loss calls them in turn); every parameter of both
    gets a gradient every step, so DDP's unused-parameter error cannot occur."""
    if module is None or rank_and_world()[1] == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def font(size=14):
    try:
        return ImageFont.load_default(size=size)                       # pillow >= 10.1: scalable
    except TypeError:
        return ImageFont.load_default()


def put(draw, xy, text, fnt, anchor="la"):
    """draw.text anchored l/m/r and a/m, by hand: older pillow's bitmap font has no anchors."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    x = xy[0] - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]]
    draw.text((x, xy[1] - {"a": 0, "m": (y1 + y0) / 2}[anchor[1]]), text, fill="black", font=fnt)


def axis_ticks(lo, hi, log=False):
    """Round ticks whose first is at or below lo and last at or above hi, so the axis spans them
    and every gridline is labelled: 1-2-5 per decade on a log axis over 5x or more, else steps
    of 1, 2 or 5 x 10^k (halved on a log axis until the first tick is above 0)."""
    if log and hi > 5 * lo:
        decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
        ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5)]
        first, last = max(v for v in ticks if v <= lo), min(v for v in ticks if v >= hi)
        return [v for v in ticks if first <= v <= last]
    raw = max(hi - lo, abs(hi) * 1e-6) / 4 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)),
               key=lambda v: abs(v - raw))
    while log and math.floor(lo / step) * step <= 0:
        step /= 2
    first, last = math.floor(lo / step), max(math.ceil(hi / step), math.floor(lo / step) + 1)
    first -= first * step > lo                                 # float rounding of lo / step
    last += last * step < hi
    return [k * step for k in range(first, last + 1)]


def thick_line(image, points, color, width):
    """A polyline of the same thickness at every slope: the pixels whose centres lie within
    width / 2 of a segment (pillow's wide lines come out thinner on shallow segments)."""
    r, mask = width / 2, np.zeros((image.height, image.width), bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
        top, left = max(int(min(y0, y1) - r), 0), max(int(min(x0, x1) - r), 0)
        bottom = min(int(max(y0, y1) + r) + 2, image.height)
        yy, xx = np.mgrid[top:bottom, left:min(int(max(x0, x1) + r) + 2, image.width)] + 0.5
        dx, dy = x1 - x0, y1 - y0                      # nearest point: (x0, y0) + s (dx, dy)
        s = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy or 1), 0, 1)
        near = np.hypot(xx - x0 - s * dx, yy - y0 - s * dy) <= r
        mask[top:bottom, left:left + xx.shape[1]] |= near
    image.paste(color, mask=Image.fromarray(mask))


def line_chart(path, series, title, xlabel, ylabel, logy=False, note=None, size=(900, 560)):
    """series: (label, xs, ys[, color index[, thin]]). Thin lines (one seed beside a mean) are a
    lighter shade without markers; a None label has no legend entry. Markers up to 30 points."""
    keep = lambda y: math.isfinite(y) and (y > 0 or not logy)
    series = [(label, [float(x) for x, y in zip(xs, ys) if keep(y)],
               [float(y) for y in ys if keep(y)], *style) for label, xs, ys, *style in series]
    W, H = size
    left, right, top, bottom = 80, 200, 50 + (18 if note else 0), 60
    img = Image.new("RGB", size, "white")
    draw, big, small = ImageDraw.Draw(img), font(16), font(12)
    xs = [x for s in series for x in s[1]] or [0.0, 1.0]
    ys = [y for s in series for y in s[2]] or [1.0, 2.0]
    xticks, yticks = axis_ticks(min(0.0, min(xs)), max(xs)), axis_ticks(min(ys), max(ys), logy)
    fy = math.log10 if logy else float
    px = lambda x: left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * (W - left - right)
    py = lambda y: H - bottom - (fy(y) - fy(yticks[0])) / (fy(yticks[-1]) - fy(yticks[0])) * (
        H - top - bottom)
    draw.text((left, 12), title, fill="black", font=big)
    if note:
        draw.text((left, 34), note, fill=(200, 0, 0), font=small)
    for v in yticks:
        draw.line([left, py(v), W - right, py(v)], fill=(225, 225, 225))
        put(draw, (left - 8, py(v)), f"{v:g}", small, "rm")
    for v in xticks:
        draw.line([px(v), top, px(v), H - bottom], fill=(235, 235, 235))
        put(draw, (px(v), H - bottom + 6), f"{v:g}", small, "ma")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    put(draw, ((left + W - right) / 2, H - 22), xlabel, big, "mm")
    draw.text((12, top - 22), ylabel, fill="black", font=small)
    legend = 0
    for i, (label, sx, sy, *style) in enumerate(series):
        index, thin = (style + [i, False][len(style):])[:2]
        color = COLORS[index % len(COLORS)]
        color = tuple(round(c + (255 - c) * 0.55) for c in color) if thin else color
        points = [(px(x), py(y)) for x, y in zip(sx, sy)]
        thick_line(img, points, color, 1.5 if thin else 2.5)
        for x, y in points if len(points) <= 30 and not thin else []:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        if label is not None:
            ly, legend = top + 10 + 22 * legend, legend + 1
            thick_line(img, [(W - right + 12, ly), (W - right + 36, ly)], color, 3)
            put(draw, (W - right + 42, ly), label, small, "lm")
    img.save(path)


def image_grid(images, ncol=10, pad=2):
    """uint8 (N, h, w, 3) -> one PIL image, ncol per row."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + c * (w + pad):(c + 1) * (w + pad)] = im
    return Image.fromarray(grid)


def panels(path, named_images, title, scale=2, ncol=10):
    """Grids side by side, each under its name, upscaled for viewing (nearest: pixels stay)."""
    grids = [image_grid(np.asarray(im), min(ncol, len(im))) for _, im in named_images]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    canvas = Image.new("RGB", (sum(g.width + 20 for g in grids) + 20,
                               max(g.height for g in grids) + 70), "white")
    draw, x = ImageDraw.Draw(canvas), 20
    draw.text((20, 10), title, fill="black", font=font(16))
    for (name, _), g in zip(named_images, grids):
        draw.text((x, 40), name, fill="black", font=font(14))
        canvas.paste(g, (x, 62))
        x += g.width + 20
    canvas.save(path)


LOG_FILE = None


def say(*lines):
    """Print and append to out/log.txt, so the log holds exactly what the user saw (rank 0)."""
    if rank_and_world()[0] != 0:
        return
    for line in lines:
        print(line, flush=True)
        if LOG_FILE is not None:
            with open(LOG_FILE, "a") as f:
                f.write(line + "\n")


def read_cache(path, load):
    """load() of a cache file, or None if there is none or it is unreadable (then it is built
    again: a cache holds nothing that cannot be made again)."""
    if not Path(path).is_file():
        return None
    try:
        return load()
    except Exception as error:
        say(f"note: cache file {path} is unreadable ({type(error).__name__}); building it again")
        return None


def digest(*parts):
    """Short hash of JSON-able settings and byte strings: the cache key."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def sync_time(device, tic):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def machine():
    """What ran it: the commit (with '+changes' if the tree differed) and the hardware."""
    git = lambda *a: subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *a],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        commit = (commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                            else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(commit=commit, platform=platform.platform(), cpu_count=os.cpu_count(),
                processor=platform.processor() or platform.machine(), torch=torch.__version__,
                python=platform.python_version())


if __name__ == "__main__":
    main()
