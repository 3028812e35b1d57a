#!/usr/bin/env python3
"""tiny_demo.py: does SRA 2 make a diffusion transformer converge faster? CIFAR-10, one GPU, minutes.

    python tiny_demo.py                       # the demo (one GPU; --help lists every knob)
    python tiny_demo.py --preset cpu          # the same question on two CPU cores (smaller SiT)
    python tiny_demo.py --quick               # CPU smoke test of the whole pipeline (synthetic data)
    python tiny_demo.py --ablate              # Table 1 of the paper in miniature
    python tiny_demo.py ... --resume          # after a crash or a kill: the same flags, plus --resume
    torchrun --nproc_per_node=N tiny_demo.py  # N GPUs (DDP): the same run, the batch split N ways

Pipeline
  1. Data     CIFAR-10 train (50,000 32x32 images), downloaded once from the official archive (MD5
              checked, written to a temporary file and renamed) into --cache; or --data PATH (a
              cifar-10-batches-py folder or the .tar.gz). Horizontal flips for training.
  2. Stage 1  A small KL-regularised conv VAE, 32x32x3 -> 16x16x4 (downsample 2, so SiT-?/2 sees
              8x8 = 64 tokens of p*p*C = 16 values, the SD-VAE's token size), trained here. The set
              and its mirror image are encoded once and cached, keyed by a hash of the VAE settings
              and of the data. That is the paper's premise made concrete: f_VAE exists before stage 2.
  3. Stage 2  SiT on the latents, class-conditional (10 classes, label dropout 0.1), trained twice
              with the same seed, init, data order, noise draws, steps and batch: the baseline, and
              SRA 2 (projector P on block align_depth pulled toward the clean latent).
  4. Measure  The held-out loss: the denoising term on CIFAR-10 test images (never trained on) at
              a fixed t grid with fixed noise, overall and in three bands of t, so both runs and
              every checkpoint are judged on the same draws (low noise, paired). FID against the
              training images (protocol below), both loss terms, training wall time; Table 2 in
              miniature and the speed-up: the fraction of steps (and of wall time) after which
              SRA 2 stays at or below the baseline's final FID (last crossing).
  5. Pictures PNGs written with pillow: FID and held-out loss vs steps, FID vs wall-clock, loss
              curves, sample grids of both runs at matched steps (same noise and labels), VAE
              reconstructions.

Conventions are sra2.py's: t = 0 data, t = 1 noise, x_t = (1 - t) z + t eps, v = eps - z.
z (N, 4, 16, 16) is the normalised VAE latent, which is also f_VAE, the alignment target.

FID protocol (all FIDs use the EMA weights, no CFG, and fid.py's "tf" convention)
  - reference: Inception statistics of the first --fid-ref-n training images (all 50,000 by
    default), cached;
  - at --evals checkpoints, evenly spaced, the last one at the final step: FID of --fid-n images
    (2,000) from the Euler-Maruyama SDE with --fid-sampling-steps (50) steps. The speed-up is read
    off these curves, by linear interpolation between checkpoints;
  - at the end of each run: FID of --final-fid-n images (5,000) with the paper's 250-step sampler;
  - the floor: the same FIDs of VAE reconstructions of real training images (what a perfect
    diffusion model would score through this decoder);
  - noise and labels (class i % 10 for image i) come from a fixed sampling seed, so both runs and
    every checkpoint are judged on the same draws.
  FID-2k and FID-5k are biased upward against FID-50k; compare them only with each other.

Outputs, all under --out: table.txt (what is printed at the end), results.json (every setting and
number), log.txt, fid_vs_steps.png, fid_vs_time.png, loss_curves.png, samples_stepNNNNNN.png (both
runs side by side at each checkpoint), samples_final.png, vae_reconstructions.png, ckpt/<run>.pt
(ckpt/<run>-seed<k>.pt with several seeds).
Cache (--cache): cifar-10-python.tar.gz, stage1-<key>.pt (VAE + latents), fid-ref-<key>.npz.

Time: the default (GPU) run has not been timed. Counted FLOPs (FlopCounterMode): a training step
at batch 256 is 2.11 TFLOP for the baseline and 2.31 for SRA 2 (+10%: P is large next to S/2);
`python bench.py` times steps on your card. --preset cpu on two cores: README, Results.

Choices (and why)
  - VAE: width 64 (1.6M parameters), latent 4 channels, MSE + 1e-5 x KL (per element), 3,000 steps
    of batch 256 (about a minute on an H100), seed fixed (one VAE for every --seed, as the SD-VAE
    is fixed in the paper). The KL only keeps the posterior tame; the latents are then normalised
    to mean 0 and std 1 by a measured shift and scale (the SD-VAE's 0.18215 is this scale for its
    latents). The cache stores the posterior means of both flips (REPA-style precomputed latents),
    so a flipped image gets its own true latent. On CIFAR-10, a width-32 version of it reached
    MSE 0.0067 (PSNR 28 dB) after 400 CPU steps of batch 64.
  - Stage 2 default: SiT-S/2 (12 blocks, D = 384, 32.5M parameters; P adds 2.1M, dropped at
    inference), the paper's smallest /2 preset: B/2 costs 4x the FLOPs and would not fit two runs
    of meaningful length into 5 minutes. Batch 256, AdamW lr 3e-4
    (constant, weight decay 0, betas 0.9/0.999), gradient clip 1.0 (as REPA), 4,000 steps (20
    epochs), bf16 autocast on CUDA. The paper's lr 1e-4 is for 400K steps; a run of minutes needs
    more, and the same lr is used for both runs. SRA 2: block 2 (the paper's choice for 12-block
    models), 5-layer projector of width 2D, smooth-L1 (beta 0.05), lambda 1, t in [0, 1].
  - EMA: decay min(0.9999, (1 + k) / (10 + k)) at step k. A fixed 0.9999 would still be mostly the
    initial weights after 4,000 steps; this warm-up averages roughly the last tenth of the run.
  - Same data order: the batch of step k is a pure function of (seed, k) (a fresh permutation and
    flip pattern per epoch), so both runs see identical batches and a resumed run needs only k.
    Same noise: t, eps and the label-dropout mask of step k are drawn for the whole batch from a
    generator seeded by (seed, k) (step_noise), so they too are the same in both runs, after a
    resume, and under torchrun (each rank takes its share of the same draw).
  - Checkpoints: every --ckpt-minutes (and every --ckpt-every steps) and at the end of each run,
    out/ckpt/<run>.pt, written to a temporary file and renamed (a kill during a save leaves the
    previous file whole); model, EMA, projector, optimizer, step, settings, RNG states and
    history, all plain tensors and Python values, so torch.load(weights_only=True) reads them.
    --resume continues each run from its file (a finished run is not trained again; its record is
    reused) and ends bit for bit where an uninterrupted run ends on a CPU (tested with SIGKILL).
    It refuses, in one line and before touching anything, a file that is unreadable or from other
    settings (only where files go and how fast or often it runs may change); and a fresh start
    refuses to overwrite an unfinished run's file. A non-finite loss or gradient stops the run
    with the step where it first appeared; checkpoints are written only after that check, so the
    last one on disk is good.
  - Multi-GPU: `torchrun --nproc_per_node=N tiny_demo.py ...` runs DistributedDataParallel (NCCL
    on CUDA, gloo with --device cpu). Rank r trains on samples r, r + N, ... of each global batch
    (--batch-size must divide by N), so N processes compute the run one process would, up to
    float rounding (tested: two gloo ranks against one process). SiT and P are wrapped
    separately; every parameter of each gets a gradient every step, so DDP never reports unused
    ones. Rank 0 alone prints and writes files; rank 0 first builds the caches, which the others
    then read (one machine, or a shared --cache); FID sampling is split by chunk across ranks and
    gathered, Inception runs on rank 0. Resuming with another N continues the same run, up to
    float rounding (tested: a one-process run resumed on two gloo ranks).
  - Small FIDs (<= 256 images: --quick and the tests on a CPU) take a shortcut that is exact, not
    approximate: with S_gen = B^T B (B the n x 2048 centred features / sqrt(n - 1)),
    tr((S_ref S_gen)^1/2) = tr((B S_ref B^T)^1/2), an n x n eigenproblem instead of 2048 x 2048.
    Larger FIDs go through fid.compute_statistics and fid.frechet_distance unchanged.
  - --quick: synthetic images (coloured shapes, a class per shape and hue) unless --data is given,
    a 4-block D = 128 SiT, a width-16 VAE, a handful of FID images, one CPU thread (OpenMP threads
    spin-wait on each other: on a busy 2-core machine 2 threads ran it in 239 s, 1 thread in 51 s).
    It checks that everything runs; its numbers mean nothing, and every table and chart says so.
"""
import argparse
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
from torch.nn.parallel import DistributedDataParallel
from PIL import Image, ImageDraw, ImageFont

import fid
import sra2

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
SMALL_FID = 256          # up to this many images, FID takes the exact n x n shortcut (see docstring)
VAE_SEED = 0             # one VAE for every --seed: stage 1 is given, like the SD-VAE is in the paper

# Models beyond the paper's presets, for CPU runs: (preset, overrides). Head dim 64 as in SiT.
DEMO_MODELS = {"tiny": ("SiT-S/2", dict(depth=4, hidden_size=128, num_heads=2)),
               "small": ("SiT-S/2", dict(depth=8, hidden_size=128, num_heads=2))}
HELDOUT_T = 12           # the held-out set's t grid: (j + 0.5) / 12, image i at grid point i % 12
HELDOUT_SEED = 20_260    # its noise: one fixed draw, the same for every run, seed and checkpoint

# Preset defaults: every knob below is also a flag; a flag given on the command line wins.
# "cpu" answers the question on two CPU cores (settings and their evidence: README, Results).
DEFAULTS = {
    "full": dict(model="SiT-S/2", steps=4000, batch_size=256, lr=3e-4, n_images=None,
                 vae_width=64, vae_steps=3000, vae_batch=256, evals=5, fid_n=2000,
                 fid_sampling_steps=50, final_fid_n=5000, final_sampling_steps=250,
                 fid_ref_n=50000, sample_batch=1000, log_every=50, heldout_n=2000, heldout_evals=10,
                 seed="0", threads=None),
    "cpu": dict(model="small", steps=1200, batch_size=64, lr=3e-4, n_images=10000,
                vae_width=32, vae_steps=400, vae_batch=64, evals=3, fid_n=250,
                fid_sampling_steps=25, final_fid_n=0, final_sampling_steps=50,
                fid_ref_n=1000, sample_batch=250, log_every=25, heldout_n=1000, heldout_evals=8,
                seed="0,1", threads=2),
    "quick": dict(model="tiny", steps=60, batch_size=32, lr=1e-3, n_images=1024,
                  vae_width=16, vae_steps=80, vae_batch=32, evals=5, fid_n=8,
                  fid_sampling_steps=10, final_fid_n=12, final_sampling_steps=25,
                  fid_ref_n=32, sample_batch=64, log_every=5, heldout_n=24, heldout_evals=3,
                  seed="0", threads=1),
}


class DemoError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line too (argparse's own error prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"tiny_demo: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# Small utilities: one-line logging, progress line, atomic files, time formatting
# ---------------------------------------------------------------------------------------------


LOG_FILE = None


def say(*lines):
    """Print and append to out/log.txt, so the log holds exactly what the user saw (rank 0 only)."""
    if rank_and_world()[0] != 0:
        return
    for line in lines:
        print(line, flush=True)
        if LOG_FILE is not None:
            with open(LOG_FILE, "a") as f:
                f.write(line + "\n")


def fmt_time(seconds):
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A status line with rate and time left: redrawn in place on a terminal, else one line every
    15 s (logs stay short). `elapsed` may be passed in, so pauses (evaluations) don't count."""

    def __init__(self, label, total, unit="it"):
        self.label, self.total, self.unit = label, total, unit
        self.start = self.last = time.perf_counter()
        self.tty, self.shown = sys.stdout.isatty(), False

    def update(self, done, note="", elapsed=None, force=False):
        now = time.perf_counter()
        if rank_and_world()[0] != 0:                                   # one progress line, not one per GPU
            return
        if not force and done < self.total and now - self.last < (0.5 if self.tty else 15):
            return
        self.last = now
        elapsed = now - self.start if elapsed is None else elapsed
        rate = done / max(elapsed, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0
        line = (f"{self.label} {done}/{self.total}  {rate:.1f} {self.unit}/s  "
                f"{fmt_time(left)} left  {note}").rstrip()
        if self.tty:
            print("\r" + line.ljust(100)[:160], end="", flush=True)
            self.shown = True
        else:
            print(line, flush=True)

    def close(self):
        if self.shown:
            print(flush=True)


def atomic_save(path, write):
    """write(tmp_path), then rename onto `path`: an interruption never leaves a half-written file
    under the real name (os.replace is atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")   # suffix kept: np.savez
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rank_and_world():
    """(rank, number of processes): (0, 1) unless started by torchrun (see main)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank0_first(fn, *args):
    """fn(*args) on rank 0 first (it downloads, trains stage 1, writes the cache), then on the
    others, which find the cache. The barrier is in `finally`: a rank 0 that fails releases the
    others, which then fail the same way instead of waiting forever."""
    rank, world = rank_and_world()
    if rank > 0:
        dist.barrier()
    try:
        return fn(*args)
    finally:
        if rank == 0 and world > 1:
            dist.barrier()


def from_rank0(fn, *args):
    """fn(*args) computed on rank 0 only (an FID needs one Inception, not one per GPU), its value
    sent to every rank, so all ranks keep the same record."""
    rank, world = rank_and_world()
    value = [fn(*args) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def read_cache(path, load):
    """load() of a cache file, or None if there is none or it is unreadable (then it is rebuilt:
    a cache holds nothing that cannot be made again)."""
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


# ---------------------------------------------------------------------------------------------
# Data: CIFAR-10 from the official archive or a folder, or synthetic shapes
# ---------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles; this loads numpy arrays and plain values and refuses any
    other global, so a doctored data file cannot run code."""
    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")})

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_cifar_batch(name, raw):
    """One pickled batch -> (images uint8 (n, 32, 32, 3), labels int64 (n,))."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:                                         # a bad pickle can raise anything
        raise DemoError(f"{name}: corrupt CIFAR-10 batch file ({type(error).__name__}: {error})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DemoError(f"{name}: corrupt CIFAR-10 batch file (data {data.dtype} {data.shape}, "
                        f"{len(labels)} labels; expected uint8 (n, 3072) and n labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DemoError(f"{name}: corrupt CIFAR-10 batch file (labels outside 0..9)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels    # R,G,B planes -> NHWC


def read_cifar(path, split="train"):
    """CIFAR-10's train (or test) split from a cifar-10-batches-py folder (or its parent) or the .tar.gz."""
    path = Path(path).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not path.exists():
        raise DemoError(f"--data {path}: no such file or folder")
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DemoError(f"--data {path}: not a CIFAR-10 python folder ({', '.join(missing)} missing)")
        raws = [(str(folder / n), (folder / n).read_bytes()) for n in names]
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DemoError(f"{path}: not the CIFAR-10 python archive ({', '.join(missing)} missing)")
                raws = [(f"{path}:{n}", tar.extractfile(members[n]).read()) for n in names]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise DemoError(f"{path}: corrupt or truncated archive ({type(error).__name__}: {error})") from None
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
            raise DemoError(f"could not download {CIFAR_URL} ({error}); pass --data PATH to a local "
                            "copy (a cifar-10-batches-py folder or the .tar.gz)") from None
        if md5_of(tmp) != CIFAR_MD5:
            raise DemoError(f"downloaded {CIFAR_URL} but its MD5 is wrong (corrupt transfer); run again")

    say(f"downloading CIFAR-10 (163 MiB) to {archive}")
    atomic_save(archive, fetch)
    return archive


def synthetic_images(n, seed=0):
    """Class-conditional stand-in for CIFAR-10 when there is none (tests, --quick): class k is a
    shape (k % 5: disc, square, ring, bar, cross) in a hue of its own, at a random place and size,
    on a random dark gradient. Learnable in seconds; NOT a benchmark."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i, k in enumerate(labels):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        dy, dx = yy - cy, xx - cx
        mask = [dy**2 + dx**2 < r**2, np.maximum(abs(dy), abs(dx)) < r * 0.8,
                abs(np.sqrt(dy**2 + dx**2) - r * 0.8) < 2, abs(dy) < r * 0.35,
                (abs(dy) < 2) | (abs(dx) < 2)][k % 5]
        mask &= (abs(dy) < r) & (abs(dx) < r)
        hue = (k / 10 + np.array([0, 1 / 3, 2 / 3])) * 2 * np.pi
        color = 140 + 110 * np.cos(hue + rng.normal(0, 0.15))
        background = rng.uniform(0, 90, 3) * (0.5 + 0.5 * (yy / 31)[..., None])
        images[i] = np.where(mask[..., None], color, background).clip(0, 255)
    return images, labels.astype(np.int64)


def load_data(args):
    """(images uint8 (N, 32, 32, 3), labels (N,), description, identity hash)."""
    if args.data == "synthetic":
        images, labels = synthetic_images(args.n_images or 50000, args.seed)
        desc = f"SYNTHETIC shapes ({len(labels)} images; not CIFAR-10, numbers not meaningful)"
    else:
        source = Path(args.data) if args.data else download_cifar(args.cache)
        images, labels = read_cifar(source)
        if args.data and source.is_file() and source.name.endswith("gz") and md5_of(source) != CIFAR_MD5:
            say(f"note: {source} is not the official archive (MD5 differs); using it anyway")
        images, labels = images[:args.n_images], labels[:args.n_images]
        desc = f"CIFAR-10 train ({len(labels)} images, from {source})"
    return images, labels, desc, digest(images.tobytes(), labels.tobytes())


def load_test_images(args):
    """The first --heldout-n images of CIFAR-10's test split (never trained on), or synthetic ones
    drawn with a seed of their own."""
    if args.data == "synthetic":
        return synthetic_images(args.heldout_n, seed=1_000_003)
    images, labels = read_cifar(Path(args.data) if args.data else download_cifar(args.cache), "test")
    if len(images) < args.heldout_n:
        raise DemoError(f"--heldout-n {args.heldout_n}: the test split has {len(images)} images")
    return images[:args.heldout_n], labels[:args.heldout_n]


# ---------------------------------------------------------------------------------------------
# Stage 1: the VAE whose latents are both what SiT denoises and SRA 2's target f_VAE
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class VAE(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] <-> latents (N, C, 16, 16); posterior N(mean, exp(logvar))."""

    def __init__(self, width=64, latent_channels=4):
        super().__init__()
        w, C = width, latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), ResBlock(w),                               # (N, w, 32, 32)
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), ResBlock(2 * w), ResBlock(2 * w),  # (N, 2w, 16, 16)
            nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.Conv2d(2 * w, 2 * C, 3, padding=1))  # (N, 2C, 16, 16)
        self.decoder = nn.Sequential(
            nn.Conv2d(C, 2 * w, 3, padding=1), ResBlock(2 * w), ResBlock(2 * w),       # (N, 2w, 16, 16)
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * w, w, 3, padding=1), ResBlock(w),  # (N, w, 32, 32)
            nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1))               # (N, 3, 32, 32)

    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)                  # 2 x (N, C, 16, 16)
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
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)   # z ~ q(z | x)
            x_hat = vae.decode(z)
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
    """Posterior means of every image and of its mirror image: (2, N, C, 16, 16) float32 on CPU."""
    out, bar = [[], []], Progress("stage 1: encoding", len(images), "img")
    for i in range(0, len(images), batch):
        x = to_float(torch.from_numpy(images[i:i + batch]).to(device))
        for flip in (0, 1):
            out[flip].append(vae.encode(x.flip(3) if flip else x)[0].float().cpu())
        bar.update(i + len(x))
    bar.close()
    return torch.stack([torch.cat(out[0]), torch.cat(out[1])])


def stage1(images, data_id, args, device):
    """Train (or load from the cache) the VAE; return it with the normalised latents (2, N, C, 16, 16)."""
    settings = dict(width=args.vae_width, channels=args.latent_channels, kl=args.vae_kl, lr=args.vae_lr,
                    steps=args.vae_steps, batch=args.vae_batch, seed=VAE_SEED, version=1)
    path = Path(args.cache) / f"stage1-{digest(settings, data_id)}.pt"
    saved = read_cache(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    if saved is not None:
        say(f"stage 1: VAE and latents from the cache ({path.name})")
    else:
        t0 = time.perf_counter()
        vae = train_vae(images, args, device)
        latents = encode_all(vae, images, device)                      # (2, N, C, 16, 16)
        # Normalise to mean 0, std 1 (SD-VAE: scale 0.18215): diffusion noise eps ~ N(0, I) must
        # be on the latents' scale, and the SRA 2 target inherits it.
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        saved = dict(vae={k: v.cpu() for k, v in vae.state_dict().items()}, settings=settings,
                     latents=((latents - shift) * scale).half(), shift=shift, scale=scale,
                     raw_std=latents.std().item(), seconds=time.perf_counter() - t0)
        atomic_save(path, lambda tmp: torch.save(saved, tmp))
        say(f"stage 1: VAE trained and {2 * len(images)} latents encoded in {fmt_time(saved['seconds'])} "
            f"(cached as {path.name})")
    vae = VAE(args.vae_width, args.latent_channels)
    vae.load_state_dict(saved["vae"])
    vae = vae.to(device).eval().requires_grad_(False)
    z = saved["latents"].float()
    say(f"        latents {tuple(z.shape[1:])} x 2 flips; raw std {saved['raw_std']:.3f} -> normalised by "
        f"shift {saved['shift']:+.3f}, scale {saved['scale']:.4f} (std now {z.std():.3f})")
    return SimpleNamespace(vae=vae, latents=z, shift=saved["shift"], scale=saved["scale"],
                           seconds=saved.get("seconds", 0.0))


@torch.no_grad()
def heldout_set(args, stage, device):
    """The held-out set: --heldout-n test images encoded by the stage-1 VAE (posterior means,
    normalised like the training latents), image i at t = (j + 0.5) / HELDOUT_T with j = i mod
    HELDOUT_T, and one fixed noise draw. Every run, seed and checkpoint is judged on the same
    (z, y, t, eps), so differences between runs are not sampling noise."""
    images, labels = load_test_images(args)
    z = torch.cat([(stage.vae.encode(to_float(torch.from_numpy(b).to(device)))[0].float() - stage.shift)
                   * stage.scale for b in np.array_split(images, max(1, len(images) // 500))])   # (n, C, 16, 16)
    grid = (torch.arange(HELDOUT_T, dtype=torch.float64) + 0.5) / HELDOUT_T
    t = grid[torch.arange(len(z)) % HELDOUT_T].float()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED))
    return SimpleNamespace(z=z, y=torch.as_tensor(labels).to(device), t=t.to(device), eps=eps.to(device))


HELDOUT_BANDS = {"low": (0, 1 / 3), "middle": (1 / 3, 2 / 3), "high": (2 / 3, 1)}   # t in [lo, hi)


@torch.no_grad()
def heldout_loss(model, held, batch=100):
    """The training objective's denoising term on the held-out set: |v_theta(x_t, t, y) - v|^2 with
    v = eps - z, averaged over C, H, W and the images; overall and per band of t (low t: little
    noise). Labels always given (no dropout: eval mode), float32 without autocast (TF32 matmuls
    on CUDA, as in training): the same number for the same weights, bitwise on a CPU."""
    per_image = []
    with torch.autocast(held.z.device.type, enabled=False):
        for z, y, t, eps in zip(*(v.split(batch) for v in (held.z, held.y, held.t, held.eps))):
            x_t, v_target = sra2.interpolate(z, eps, t)                # x_t = (1 - t) z + t eps
            per_image.append((model(x_t, t, y).float() - v_target).square().mean((1, 2, 3)))   # (b,)
    per_image = torch.cat(per_image)
    bands = {name: per_image[(held.t >= lo) & (held.t < hi)].mean().item()
             for name, (lo, hi) in HELDOUT_BANDS.items()}
    return dict(loss=per_image.mean().item(), **bands)


@torch.no_grad()
def decode(stage, z):
    """Normalised latents (N, C, 16, 16) -> uint8 images (N, 32, 32, 3) on the CPU."""
    return to_uint8(stage.vae.decode(z.float() / stage.scale + stage.shift))


# ---------------------------------------------------------------------------------------------
# FID (fid.py does the work; see the protocol in the module docstring)
# ---------------------------------------------------------------------------------------------


def fid_small(features, mu_ref, sigma_ref):
    """Exact FID for few generated images (n of them), without a D x D covariance of their own.
    S_gen = B^T B with B = (F - mu) / sqrt(n - 1) and S_ref = C C^T (fid.psd_factor), so
    tr((S_ref S_gen)^1/2) is the sum of the singular values of B C (n, R): exact for every n and D
    (no square roots of rounding-noise eigenvalues, which a route through B S_ref B^T would take)."""
    features = np.asarray(features, np.float64)
    n, mu = len(features), features.mean(0)
    B = (features - mu) / math.sqrt(n - 1)                             # (n, D)
    tr_covmean = np.linalg.svd(B @ fid.psd_factor(sigma_ref, "sigma_ref"), compute_uv=False).sum()
    diff = mu - mu_ref
    return float(diff @ diff + np.trace(sigma_ref) + (B * B).sum() - 2 * tr_covmean)


class FIDMeter:
    """FID of uint8 images against the reference statistics of the training images."""

    def __init__(self, args, images, data_id, device):
        self.device = device
        self.n_ref = min(args.fid_ref_n, len(images))                    # what the reference really holds
        try:                                       # fid.py names a file that is not the weights
            self.model = fid.load_inception(args.inception, device)
        except ValueError as error:
            raise DemoError(f"--inception {error}") from None
        weights = Path(args.inception) if args.inception else None
        key = digest(data_id, self.n_ref, "tf", weights.name if weights else "default",
                     weights.stat().st_size if weights else 0)
        path = Path(args.cache) / f"fid-ref-{key}.npz"
        cached = read_cache(path, lambda: fid.load_statistics(path))
        if cached is not None:
            self.mu, self.sigma = cached
        else:
            ref = images[:self.n_ref]
            say(f"FID reference: Inception statistics of {len(ref)} training images (cached afterwards)")
            self.mu, self.sigma = self.statistics(ref)
            atomic_save(path, lambda tmp: fid.save_statistics(tmp, self.mu, self.sigma, "tf"))

    def statistics(self, images, batch=500):
        """(mu, sigma) with a progress line: fid.compute_statistics on a stream of batches."""
        bar = Progress("  Inception", len(images), "img")

        def batches():
            for i in range(0, len(images), batch):
                bar.update(i)
                yield images[i:i + batch]
        mu_sigma = fid.compute_statistics(batches(), self.model, batch_size=200, device=self.device)
        bar.close()
        return mu_sigma

    @torch.no_grad()
    def features(self, images):
        """Pool3 features (n, 2048), preprocessed exactly as fid.compute_statistics does (which
        also turns TF32 off on a GPU; this path is for the few-image runs on a CPU)."""
        with torch.autocast(self.device.type, enabled=False):
            return torch.cat([self.model(fid.preprocess(b.to(self.device), "tf"))[0].double().cpu()
                              for b in torch.as_tensor(images).split(64)]).numpy()

    def __call__(self, images):
        if len(images) > SMALL_FID:
            return fid.frechet_distance(self.mu, self.sigma, *self.statistics(torch.as_tensor(images)))
        return fid_small(self.features(images), self.mu, self.sigma)


@torch.no_grad()
def generate(model, stage, n, num_steps, args, device, label):
    """n images (uint8 NHWC) from `model` with the papers' Euler-Maruyama sampler, no CFG. Noise
    and labels (image i has class i % 10) come from a fixed seed: matched across runs and steps.
    Under torchrun, rank r samples chunks r, r + world, ... and every rank gets all n images."""
    rank, world = rank_and_world()
    chunks = list(enumerate((torch.arange(n, device=device) % 10).split(args.sample_batch)))
    C, H = args.latent_channels, 16
    mine, bar = [], Progress(f"  sampling {label}", sum(len(y) for _, y in chunks[rank::world]), "img")
    for chunk, y in chunks[rank::world]:
        # A generator per chunk: chunk c's draws depend on (seed, c) only, so sharing the chunks
        # out across GPUs changes not a single sample.
        generator = torch.Generator(device).manual_seed(10_007 * (args.seed + 1) + chunk)
        noise = torch.randn(len(y), C, H, H, generator=generator, device=device)
        with sra2.autocast(device, enabled=device.type == "cuda"):
            z = sra2.sample_sde(model, noise, y, num_steps=num_steps, generator=generator)
        mine.append((chunk, decode(stage, z)))
        bar.update(sum(len(images) for _, images in mine))
    bar.close()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)                         # CPU uint8 images, small
        mine = sorted((part for parts in gathered for part in parts), key=lambda part: part[0])
    return torch.cat([images for _, images in mine])


# ---------------------------------------------------------------------------------------------
# Stage 2: one training run (baseline when run.align is False)
# ---------------------------------------------------------------------------------------------


def model_config(args):
    """The SiTConfig the run will build, without building it (for checks and tables)."""
    preset, overrides = DEMO_MODELS.get(args.model, (args.model, {}))
    fields = {**sra2.PRESETS[preset], **overrides, **sit_overrides(args)}
    return preset, overrides, sra2.SiTConfig(**fields)


def sit_overrides(args):
    return dict(input_size=16, in_channels=args.latent_channels, num_classes=10)


def build(args, run, device):
    preset, overrides, _ = model_config(args)
    torch.manual_seed(args.seed)                                          # same SiT init in every run
    model = sra2.create_sit(preset, **overrides, **sit_overrides(args)).to(device)
    projector = (sra2.make_projector(model, depth=run.mlp_depth, width=run.mlp_width).to(device)
                 if run.align else None)
    return model, projector


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n, device="cpu"):
    """A permutation of the n images and a flip bit per image, from (seed, epoch) alone. Drawn on the
    CPU (the same on every device) and copied once per epoch, so the steps slice it on the device
    without a host-to-device copy (and the wait it brings) each step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm, flip = torch.randperm(n, generator=g), torch.randint(0, 2, (n,), generator=g)
    return perm.to(device), flip.to(device)


def batch_indices(step, n, batch_size, seed, device="cpu"):
    """Images and flips of training step `step`: a fresh permutation and flip pattern per epoch,
    a pure function of (seed, step), so every run sees the same batches and resuming needs only
    the step. The last partial batch of an epoch is dropped."""
    epoch, i = divmod(step, n // batch_size)
    perm, flip = epoch_order(seed, epoch, n, torch.device(device))
    idx = perm[i * batch_size:(i + 1) * batch_size]
    return idx, flip[idx]


def step_noise(generator, seed, step, shape, drop_prob):
    """t, eps and the label-dropout mask of the whole global batch of step `step`, from (seed, step)
    alone, like the batch itself: both runs draw the same, a resumed run needs nothing but the
    step, and under torchrun each rank takes its share of exactly what one process would draw."""
    generator.manual_seed((seed + 1) << 32 | step)
    t = torch.rand(shape[0], generator=generator, device=generator.device)       # t ~ U[0, 1)
    eps = torch.randn(shape, generator=generator, device=generator.device)       # eps ~ N(0, I)
    drop = torch.rand(shape[0], generator=generator, device=generator.device) < drop_prob
    return t, eps, drop


def data_parallel(module, device):
    """Under torchrun, the module in DistributedDataParallel: it starts every rank from rank 0's
    weights and averages the gradients over the ranks during backward. SiT and P get a wrapper
    each, since training_loss calls them one after the other; every parameter of both gets a
    gradient at every step (the baseline has no P), so DDP's unused-parameter error cannot occur."""
    if module is None or rank_and_world()[1] == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def train_run(run, stage, labels, args, device, fid_meter, out):
    """Train one run for args.steps (with --resume, from its checkpoint on); evaluate FID at args.evals
    checkpoints. Returns its record. Under torchrun, every rank runs this; rank 0 saves."""
    rank, world = rank_and_world()
    model, projector = build(args, run, device)
    ema = sra2.create_ema(model)
    sit_params = [p for p in model.parameters() if p.requires_grad]
    params = sit_params + list(projector.parameters() if projector else [])
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0, fused=device.type == "cuda")
    # Clipping: SiT and P as one vector (REPA), so a large alignment gradient also shrinks the
    # denoising update; each on its own; or none (the norm is still measured and logged).
    groups = [g for g in ([sit_params, params[len(sit_params):]] if args.clip == "separate" else [params]) if g]
    limit = args.grad_clip if args.clip != "none" else math.inf

    rec = dict(name=run.name, label=run.label, seed=args.seed, settings=run.settings, log=[], evals=[], heldout=[],
               params=sum(p.numel() for p in model.parameters()),
               projector_params=sum(p.numel() for p in projector.parameters()) if projector else 0)
    path, start = ckpt_path(args, out, run), 0
    if args.resume and path.is_file():                                    # checked by check_checkpoints
        start, rec = restore(load_checkpoint(path, args, run), model, ema, projector, opt)
        say(f"{run.label}: " + ("finished; its record is reused" if "final_fid" in rec else f"resumed at step {start}")
            + f" ({path})")
        if "final_fid" in rec:
            return rec
    net, proj = data_parallel(model, device), data_parallel(projector, device)
    forward = torch.compile(net) if args.compile else net
    latents, labels = stage.latents.to(device), torch.as_tensor(labels).to(device)
    patch = model.config.patch_size
    eval_steps = {round(args.steps * (i + 1) / args.evals) for i in range(args.evals)}
    heldout_steps = {round(args.steps * (i + 1) / args.heldout_evals) for i in range(args.heldout_evals)}
    generator, mine = torch.Generator(device), slice(rank, None, world)   # this rank's share of a global batch
    sums, first_bad = torch.zeros(5, device=device), torch.zeros((), dtype=torch.long, device=device)
    wall, last_log, saved, last_ckpt = rec.get("wall", 0.0), start, start or None, time.perf_counter()
    bar, tic = Progress(f"stage 2: {run.label}", args.steps), time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        idx, flip = batch_indices(step - 1, len(labels), args.batch_size, args.seed, device)
        t, eps, drop = step_noise(generator, args.seed, step, (args.batch_size, *latents.shape[2:]),
                                  model.config.class_dropout_prob)
        idx, flip, t, eps, drop = idx[mine], flip[mine], t[mine], eps[mine], drop[mine]
        z, y = latents[flip, idx], labels[idx]                         # (B/world, C, 16, 16), (B/world,)
        target = sra2.patchify(z, patch) * run.target_scale if proj is not None else None
        with sra2.autocast(device, enabled=device.type == "cuda"):
            parts = sra2.training_loss(forward, z, y, proj, lam=run.lam, align_depth=run.align_depth,
                                       align_loss=run.align_loss, t_range=run.t_range, t=t, eps=eps,
                                       drop_labels=drop, target=target)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()                                       # DDP: gradients averaged over ranks
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(g, limit) for g in groups])   # before clipping
        grad_norm = norms.square().sum().sqrt()                        # of SiT and P together
        opt.step()
        sra2.update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))   # EMA warm-up
        terms = torch.stack([parts["loss"], parts["denoise"], parts["align"], grad_norm]).detach()
        sums += torch.cat([terms, (norms > args.grad_clip).any().float()[None]])  # last: steps above the clip
        first_bad = torch.where((first_bad == 0) & ~terms.isfinite().all(), step, first_bad)   # no host sync
        if step == start + 1:                      # compile and CUDA start-up: not train time, in both runs
            sync_time(device, tic)
            tic = time.perf_counter()
        ckpt_due = args.ckpt_every > 0 and step % args.ckpt_every == 0
        if step % args.log_every == 0 or step in eval_steps | heldout_steps or ckpt_due:   # one host sync a line
            if world > 1:                                              # the global batch's numbers, on every rank
                dist.all_reduce(sums)
                dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
            loss, denoise, align, norm, clipped = (sums / (world * (step - last_log))).tolist()
            rec["clipped"] = rec.get("clipped", 0) + round(clipped * (step - last_log))
            sums.zero_()
            if first_bad:                                              # stop before a checkpoint can save it
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
                kept = f"the last good checkpoint, step {saved}, is kept: {path}" if saved else "no checkpoint yet"
                raise DemoError(f"{run.label}: {what} at step {first_bad.item()}; stopping ({kept})")
            wall, last_log = wall + sync_time(device, tic), step
            rec["log"].append(dict(step=step, loss=loss, denoise=denoise, align=align, grad_norm=norm, wall=wall))
            bar.update(step, f"loss {loss:.4f} (denoise {denoise:.4f}, align {align:.4f})", elapsed=wall)
            if step in heldout_steps:
                tic = time.perf_counter()
                rec["heldout"].append(dict(step=step, wall=wall, **heldout_loss(ema, stage.heldout)))
                rec["heldout_seconds"] = rec.get("heldout_seconds", 0.0) + sync_time(device, tic)
            if step in eval_steps:
                bar.close()
                evaluate(ema, stage, args, device, fid_meter, rec, step, wall, run.label)
            if rank == 0 and (ckpt_due or 0 < args.ckpt_minutes < (time.perf_counter() - last_ckpt) / 60):
                save_checkpoint(path, model, ema, projector, opt, step, args, run, rec | dict(wall=wall))
                saved, last_ckpt = step, time.perf_counter()
            tic = time.perf_counter()                                  # evals and saves don't count
    bar.close()
    rec.update(final_fid=None, wall=wall)                              # the key marks a finished run
    if args.final_fid_n:
        images = generate(ema, stage, args.final_fid_n, args.final_sampling_steps, args, device, f"{run.label} final")
        rec.update(final_fid=from_rank0(fid_meter, images), final_grid=images[:100])
    if rank == 0 and (args.ckpt_minutes > 0 or args.ckpt_every > 0):        # the finished run, record included
        save_checkpoint(path, model, ema, projector, opt, args.steps, args, run, rec)
    return rec


def evaluate(ema, stage, args, device, fid_meter, rec, step, wall, label):
    """A checkpoint of the FID curve: args.fid_n samples of the EMA model, their FID and grid."""
    images = generate(ema, stage, args.fid_n, args.fid_sampling_steps, args, device, f"{label} @ {step}")
    rec["evals"].append(dict(step=step, wall=wall, fid=from_rank0(fid_meter, images)))
    rec.setdefault("grids", {})[step] = images[:100]
    say(f"  {label} step {step}: {args.ckpt_fid} {rec['evals'][-1]['fid']:.2f}  "
        f"(train time {fmt_time(wall)}, {step / wall:.1f} it/s)")


def machine():
    """What ran it: the commit (with '+changes' if the tree differed) and the hardware."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + ("+changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return dict(commit=commit, platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version())


def sync_time(device, tic):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


# ---------------------------------------------------------------------------------------------
# Checkpoints: save, check, restore (--resume)
# ---------------------------------------------------------------------------------------------

CKPT_FORMAT = "tiny_demo/2"                # /1: before the held-out loss and the study knobs
CKPT_KEYS = {"format", "step", "settings", "run", "model", "ema", "projector", "optimizer", "rng", "record"}
# Settings a resumed run may change: where files are, how fast it runs, how often it saves. Any
# other difference would make the resumed run a different run. (ckpt_fid, final_fid: derived.)
RESUME_FREE = {"out", "cache", "data", "inception", "device", "threads", "compile", "resume", "ckpt_minutes", "runs",
               "preset",
               "ckpt_every", "argv", "seed", "seeds", "quick", "ablate", "ckpt_fid", "final_fid"}


def ckpt_path(args, out, run):
    """out/ckpt/<run>.pt; with several seeds, <run>-seed<k>.pt (each seed's run is its own)."""
    return Path(out) / "ckpt" / (f"{run.name}.pt" if len(args.seeds) == 1 else f"{run.name}-seed{args.seed}.pt")


def save_checkpoint(path, model, ema, projector, opt, step, args, run, rec):
    """Everything a resume needs, as plain tensors and Python values (torch.load(weights_only=True)):
    weights, optimizer, RNG states, and the run's record so far (losses, FIDs, grids, wall time).
    The data position is `step` itself (see batch_indices and step_noise). Saved right after a
    log line, so the loss accumulator is empty."""
    state = dict(format=CKPT_FORMAT, step=step, settings=vars(args), run=vars(run),
                 model=model.state_dict(), ema=ema.state_dict(),
                 projector=projector.state_dict() if projector is not None else {},
                 optimizer=opt.state_dict(),
                 rng=dict(cpu=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
                 record=rec)
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, args, run, mmap=False):
    """The checkpoint at `path`, checked to be this run's, else one clear line. torch.load with
    weights_only=True runs no code from the file; nothing is written or moved here."""
    fix = "nothing was changed; move it away to start this run over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:                                         # torn, truncated, not torch, doctored
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise DemoError(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}: {reason}); "
                        f"{fix}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT or not CKPT_KEYS <= set(ckpt):
        raise DemoError(f"--resume: {path} is not a {CKPT_FORMAT} checkpoint; {fix}")
    show = lambda value: json.dumps(value, sort_keys=True, default=str)
    then, now = ckpt["settings"], vars(args)
    changed = [k for k in sorted(set(then) | set(now))
               if k not in RESUME_FREE and show(then.get(k)) != show(now.get(k))]
    changed += ["seed"] if ckpt["record"].get("seed") != args.seed else []
    changed += ["run"] if show(ckpt["run"]) != show(vars(run)) else []
    if changed:
        name = lambda k: ({"data_id": "the training data", "run": "the run's SRA 2 settings"}
                          .get(k, "--" + k.replace("_", "-")))
        diffs = "; ".join(f"{name(k)}: {show(then.get(k, ckpt['record'].get(k)))} there, "
                          f"{show(now.get(k, getattr(args, k, None)))} now" for k in changed[:3])
        raise DemoError(f"--resume: {path} is from another run ({diffs}); {fix}, or resume with its settings")
    return ckpt


def restore(ckpt, model, ema, projector, opt):
    """Load a checked checkpoint into the freshly built run. Returns (step, record)."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    if projector is not None:
        projector.load_state_dict(ckpt["projector"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["cpu"])                            # not used by training (keyed draws),
    if torch.cuda.is_available() and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():   # kept anyway
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["record"]


def check_checkpoints(args, runs, out):
    """Before any work. --resume: every checkpoint there must be readable and this run's.
    Without it: an unfinished run's checkpoint is never overwritten by a fresh start."""
    found = []
    for seed in args.seeds:
        args.seed = seed
        for _, _, run in runs:
            path = ckpt_path(args, out, run)
            if not path.is_file():
                continue
            if args.resume:
                found.append(load_checkpoint(path, args, run, mmap=True)["step"])
                continue
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                unfinished = "final_fid" not in ckpt["record"]
            except Exception:                                          # unreadable: nothing to lose
                continue
            if unfinished:
                raise DemoError(f"{path} holds an unfinished run (step {ckpt['step']} of "
                                f"{ckpt['settings'].get('steps')}): pass --resume to continue it, or move it "
                                "away to start over")
    args.seed = args.seeds[0]
    if args.resume and not found:
        say(f"--resume: no checkpoint in {Path(out) / 'ckpt'}; starting from scratch")


# ---------------------------------------------------------------------------------------------
# Pictures with pillow: line charts and image grids
# ---------------------------------------------------------------------------------------------

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def font(size=14):
    try:
        return ImageFont.load_default(size=size)                       # pillow >= 10.1: scalable
    except TypeError:
        return ImageFont.load_default()


def put(draw, xy, text, fnt, anchor="la", fill="black"):
    """draw.text with an anchor (l/m/r, a/m), computed by hand: older pillow's bitmap font has none."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=fnt)
    x = xy[0] - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]]
    y = xy[1] - {"a": 0, "t": 0, "m": (y1 + y0) / 2}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=fnt)


def nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2, 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1) or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda v: abs(v - raw))
    values = np.arange(math.floor(lo / step) * step, hi + step * 1.001, step)
    return [v for v in values if lo - 1e-9 <= v <= hi + 1e-9]


def line_chart(path, series, title, xlabel, ylabel, logy=False, note=None, size=(900, 560)):
    """series: list of (label, xs, ys) or (label, xs, ys, color index, thin): thin lines (e.g. one
    seed beside the mean) have no markers, and no legend entry when the label is None. Markers
    where there are few points. Log y: ticks at 1-2-5."""
    series = [(lab, list(map(float, xs)), list(map(float, ys)), *rest) for lab, xs, ys, *rest in series if len(xs)]
    W, H = size
    left, right, top, bottom = 80, 200, 50 + (18 if note else 0), 60
    img = Image.new("RGB", size, "white")
    draw, f, small = ImageDraw.Draw(img), font(16), font(12)
    xs = [x for _, a, *_ in series for x in a] or [0, 1]
    ys = [y for _, _, b, *_ in series for y in b if math.isfinite(y) and (y > 0 or not logy)] or [1, 2]
    x0, x1 = min(0.0, min(xs)), max(xs) if max(xs) > min(0.0, min(xs)) else min(xs) + 1
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    y0, y1 = fy(min(ys)), fy(max(ys))
    pad = (y1 - y0) * 0.05 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: H - bottom - (fy(y) - y0) / (y1 - y0) * (H - top - bottom)
    draw.text((left, 12), title, fill="black", font=f)
    if note:
        draw.text((left, 34), note, fill=(200, 0, 0), font=small)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    yticks = nice_ticks(y0, y1)
    if logy:                                                           # 1-2-5 per decade, else linear
        yticks = [m * 10 ** e for e in range(math.floor(y0) - 1, math.ceil(y1) + 1) for m in (1, 2, 5)
                  if y0 <= math.log10(m * 10 ** e) <= y1]
        if len(yticks) < 3:
            yticks = [v for v in nice_ticks(10 ** y0, 10 ** y1) if v > 0]
    for v in yticks:
        y = py(v)
        draw.line([left, y, W - right, y], fill=(225, 225, 225))
        put(draw, (left - 8, y), f"{v:g}", small, "rm", fill="black")
    for v in nice_ticks(x0, x1):
        x = px(v)
        draw.line([x, top, x, H - bottom], fill=(235, 235, 235))
        put(draw, (x, H - bottom + 6), f"{v:g}", small, "mt", fill="black")
    put(draw, ((left + W - right) / 2, H - 22), xlabel, f, "mm", fill="black")
    draw.text((12, top - 22), ylabel, fill="black", font=small)
    legend = 0
    for i, (label, sx, sy, *style) in enumerate(series):
        index, thin = (style + [i, False][len(style):])[:2]
        color = COLORS[index % len(COLORS)]
        if thin:                                                       # a lighter shade of the same colour
            color = tuple(round(c + (255 - c) * 0.55) for c in color)
        points = [(px(x), py(y)) for x, y in zip(sx, sy) if math.isfinite(y) and (y > 0 or not logy)]
        if len(points) > 1:
            draw.line(points, fill=color, width=1 if thin else 2, joint="curve")
        if len(points) <= 30 and not thin:
            for x, y in points:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        if label is not None:
            ly = top + 10 + 22 * legend
            legend += 1
            draw.line([W - right + 12, ly, W - right + 36, ly], fill=color, width=3)
            put(draw, (W - right + 42, ly), label, small, "lm", fill="black")
    img.save(path)


def image_grid(images, ncol=10, pad=2):
    """uint8 (N, h, w, 3) -> one PIL image, ncol per row."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    return Image.fromarray(grid)


def panels(path, named_images, title, scale=2, ncol=10):
    """Grids side by side, each under its name, upscaled for viewing (nearest: pixels stay pixels)."""
    grids = [image_grid(im, min(ncol, len(im))) for _, im in named_images]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    W = sum(g.width for g in grids) + 20 * (len(grids) + 1)
    H = max(g.height for g in grids) + 70
    canvas = Image.new("RGB", (W, H), "white")
    draw, x = ImageDraw.Draw(canvas), 20
    draw.text((20, 10), title, fill="black", font=font(16))
    for (name, _), g in zip(named_images, grids):
        draw.text((x, 40), name, fill="black", font=font(14))
        canvas.paste(g, (x, 62))
        x += g.width + 20
    canvas.save(path)


# ---------------------------------------------------------------------------------------------
# Tables and the speed-up
# ---------------------------------------------------------------------------------------------


def table(headers, rows):
    """Plain-text table, columns padded to their widest cell."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]


def reach(xs, fids, target):
    """The x from which the curve (linear between checkpoints) stays at FID <= target to the end,
    or None if it ends above. A noisy FID curve can dip below the target and come back up: the
    first dip would overstate the speed-up, so the last crossing counts.
    Returns (x, exact): exact is False when the curve is at or below target from the first checkpoint."""
    if fids[-1] > target:
        return None, True
    above = [i for i, f in enumerate(fids) if f > target]
    if not above:
        return xs[0], False
    i = above[-1]                                                      # last checkpoint above target
    (xa, fa), (xb, fb) = (xs[i], fids[i]), (xs[i + 1], fids[i + 1])
    return xa + (xb - xa) * (fa - target) / (fa - fb), True


def speedup_lines(base, sra, args):
    """The headline: the fraction of steps and of wall time SRA 2 needs for the baseline's final FID."""
    steps, sra_fid = [e["step"] for e in base["evals"]], [e["fid"] for e in sra["evals"]]
    target = base["evals"][-1]["fid"]
    head = (f"speed-up ({args.ckpt_fid} curve, seed {base['seed']}): the baseline ends at FID {target:.2f} "
            f"after {steps[-1]} steps;")
    x, exact = reach(steps, sra_fid, target)
    if x is None:
        return [head, f"  SRA 2 does NOT end at or below it (its final: {sra_fid[-1]:.2f}, best: "
                      f"{min(sra_fid):.2f}): no speed-up at this scale and length"], None
    t, _ = reach([e["wall"] for e in sra["evals"]], sra_fid, target)
    if exact:
        share = f"at step {x:.0f}: {x / steps[-1]:.2f} of the steps ({steps[-1] / x:.2f}x fewer);"
    else:                                          # only a bound: no earlier checkpoint to interpolate
        share = (f"already at its first checkpoint, step {x:.0f}: at most {x / steps[-1]:.2f} of the "
                 f"steps (at least {steps[-1] / x:.2f}x fewer; a bound, not a measurement);")
    return [head, f"  SRA 2 reaches it {share}",
            f"  in wall-clock {fmt_time(t)} against the baseline's {fmt_time(base['wall'])} "
            f"({t / base['wall']:.2f}, {base['wall'] / t:.2f}x)"], x / steps[-1]


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def mean_record(recs):
    """The seeds' average run: FID and wall time averaged checkpoint by checkpoint."""
    return dict(seed="mean", wall=mean(r["wall"] for r in recs),
                evals=[dict(step=es[0]["step"], fid=mean(e["fid"] for e in es), wall=mean(e["wall"] for e in es))
                       for es in zip(*(r["evals"] for r in recs))])


def fid_name(n, sampling_steps):
    """"FID-2k 50-step": FIDs compare only at equal sample count and sampler, so names carry both."""
    return (f"FID-{n // 1000}k" if n % 1000 == 0 else f"FID-{n}") + f" {sampling_steps}-step"


def fmt_steps(n):
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def fmt_fid(value):
    return "-" if value is None else f"{value:.2f}"


def fmt_params(n):
    return f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------
# Runs: the baseline, SRA 2, and the ablation grid (Table 1 of the paper in miniature)
# ---------------------------------------------------------------------------------------------


def make_run(args, name, label, align, **changes):
    run = SimpleNamespace(name=name, label=label, align=align, align_depth=args.align_depth,
                          align_loss=args.align_loss, lam=args.lam, t_range=tuple(args.t_range), mlp_depth=args.mlp_depth,
                          mlp_width=args.mlp_width, target_scale=args.target_scale)
    vars(run).update(changes)
    width = f"width {run.mlp_width}" if run.mlp_width else "width 2D"
    scale = f", target x {run.target_scale:g}" if run.target_scale != 1 else ""
    run.settings = ("vanilla" if not align else
                    f"block {run.align_depth}, {run.align_loss}, lambda {run.lam:g}, "
                    f"t in [{run.t_range[0]:g}, {run.t_range[1]:g}], {run.mlp_depth}-layer MLP of {width}{scale}")
    return run


def ablation_runs(args, depth):
    """(group, setting, run) rows of Table 1; the default SRA 2 run appears once per group."""
    d0 = args.align_depth
    deeper = sorted({min(depth, max(d0 + 1, depth // 2)), min(depth, max(d0 + 2, 2 * depth // 3))} - {d0})
    rows = [("", "vanilla SiT", make_run(args, "vanilla", "vanilla SiT", False))]
    default = make_run(args, "sra2", "SRA 2 (default)", True)
    groups = [("align depth", [(f"{d0}", {})] + [(f"{d}", dict(align_depth=d)) for d in deeper]),
              ("time range", [("[0, 1]", {}), ("[0, 0.5]", dict(t_range=(0.0, 0.5))),
                              ("[0.5, 1]", dict(t_range=(0.5, 1.0)))]),
              ("align loss", [("smooth-L1", {}), ("cosine", dict(align_loss="cosine")),
                              ("L1", dict(align_loss="l1")), ("L2", dict(align_loss="l2"))]),
              ("lambda", [("1.0", {}), ("0.1", dict(lam=0.1))]),
              ("MLP depth", [("5 layers", {}), ("2 layers", dict(mlp_depth=2))])]
    for group, options in groups:
        for setting, change in options:
            slug = "sra2_" + "".join(c if c.isalnum() else "-" for c in f"{group}_{setting}")
            rows.append((group, setting, default if not change else
                         make_run(args, slug, f"SRA 2, {group} {setting}", True, **change)))
    return rows


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    both = lambda key, text="": dict(default=None, help=f"{text} (default {DEFAULTS['full'][key] or 'all'}; "
                                                       f"cpu {DEFAULTS['cpu'][key]}; quick "
                                                       f"{DEFAULTS['quick'][key]})".lstrip())
    add("--preset", default="full", choices=list(DEFAULTS), help="full (one GPU), cpu (two CPU cores: the question answered "
        "in about an hour a pair), quick (smoke test) (%(default)s)")
    add("--quick", action="store_true", help="the same as --preset quick: a CPU smoke test of the whole pipeline")
    add("--ablate", action="store_true", help="Table 1 in miniature: one run per design choice")
    add("--out", default="demo_out", help="folder for the table, PNGs, log, results.json, checkpoints "
        "(%(default)s)")
    add("--data", default=None, help="cifar-10-batches-py folder, the .tar.gz, or 'synthetic' "
        "(default: download the archive into --cache; --quick: synthetic)")
    add("--cache", default=os.environ.get("SRA2_CACHE", str(Path.home() / ".cache" / "sra2")),
        help="download, stage-1 and FID-reference cache (%(default)s; env SRA2_CACHE)")
    add("--inception", default=os.environ.get(fid.WEIGHTS_ENV),
        help=f"FID Inception weights .pth (default: env {fid.WEIGHTS_ENV}, else fid.py's cache/download)")
    add("--device", default=None, help="cuda, mps or cpu (default: cuda, then mps, then cpu)")
    add("--seed", **both("seed", "one seed, or several comma-separated, each running both models"))
    add("--compile", action="store_true", help="torch.compile the SiT for training (pays on long CUDA runs)")
    add("--threads", type=int, **both("threads", "CPU threads (on a CPU only; None: torch's)"))
    g = p.add_argument_group("stage 2")
    g.add_argument("--model", choices=[*sra2.PRESETS, *DEMO_MODELS], metavar="NAME",
                   **both("model", "SiT preset, 'tiny' (4 blocks, D = 128) or 'small' (8 blocks, D = 128)"))
    g.add_argument("--steps", type=int, **both("steps"))
    g.add_argument("--batch-size", type=int, **both("batch_size"))
    g.add_argument("--lr", type=float, **both("lr", "AdamW learning rate, the same for both runs"))
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (%(default)s)")
    g.add_argument("--clip", default="joint", choices=("joint", "separate", "none"),
                   help="clip SiT and P as one vector (REPA), each on its own, or not at all (%(default)s)")
    g.add_argument("--runs", default="baseline,sra2", help="which of the two runs to train (%(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="cap of the EMA warm-up schedule (%(default)s)")
    g.add_argument("--align-depth", type=int, default=None,
                   help="aligned block, 1-indexed (default: the preset's, 2 for S and B)")
    g.add_argument("--align-loss", default="smooth_l1", choices=sra2.ALIGN_LOSSES, help="(%(default)s)")
    g.add_argument("--mlp-depth", type=int, default=5, help="projector layers (%(default)s)")
    g.add_argument("--mlp-width", type=int, default=None, help="projector width (default 2D)")
    g.add_argument("--target-scale", type=float, default=1.0,
                   help="SRA 2 target = this x the normalised latent (smooth-L1's beta is scale-bound) (%(default)s)")
    g.add_argument("--lam", type=float, default=1.0, help="weight of the alignment loss (%(default)s)")
    g.add_argument("--t-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                   help="align only where t in [LO, HI], t = 0 data (0 1)")
    g.add_argument("--n-images", type=int, **both("n_images", "use the first N training images"))
    g.add_argument("--log-every", type=int, **both("log_every", "steps per loss log line"))
    g.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint period, 0 = never (%(default)s)")
    g.add_argument("--ckpt-every", type=int, default=0, metavar="N",
                   help="also a checkpoint (and a log line) every N steps, 0 = never (%(default)s)")
    g.add_argument("--resume", action="store_true",
                   help="continue each run from --out/ckpt/<run>.pt; finished runs are not trained again")
    g = p.add_argument_group("FID protocol")
    g.add_argument("--evals", type=int, **both("evals", "checkpoints with FID per run, 0 = none (--ablate: 1)"))
    g.add_argument("--heldout-evals", type=int, **both("heldout_evals", "checkpoints with the held-out loss, 0 = none"))
    g.add_argument("--heldout-n", type=int, **both("heldout_n", "CIFAR-10 test images in the held-out set"))
    g.add_argument("--fid-n", type=int, **both("fid_n", "images per checkpoint FID"))
    g.add_argument("--fid-sampling-steps", type=int, **both("fid_sampling_steps", "SDE steps at checkpoints"))
    g.add_argument("--final-fid-n", type=int, **both("final_fid_n", "images for the final FID, 0 = none"))
    g.add_argument("--final-sampling-steps", type=int,
                   **both("final_sampling_steps", "SDE steps for the final FID"))
    g.add_argument("--fid-ref-n", type=int, **both("fid_ref_n", "training images in the reference statistics"))
    g.add_argument("--sample-batch", type=int, **both("sample_batch", "images per sampler batch"))
    g = p.add_argument_group("stage 1 (VAE)")
    g.add_argument("--vae-width", type=int, **both("vae_width", "channels at 32x32 (twice that at 16x16)"))
    g.add_argument("--vae-steps", type=int, **both("vae_steps"))
    g.add_argument("--vae-batch", type=int, **both("vae_batch"))
    g.add_argument("--vae-lr", type=float, default=3e-4, help="(%(default)s)")
    g.add_argument("--vae-kl", type=float, default=1e-5, help="KL weight per latent element (%(default)s)")
    g.add_argument("--latent-channels", type=int, default=4, help="(%(default)s)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    evals_given = args.evals is not None
    if args.quick:
        args.preset = "quick"
    args.quick = args.preset == "quick"
    for key, value in DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.data is None:
        args.data = "synthetic"
    if args.ablate and not evals_given:
        args.evals = 1                                                 # Table 1 needs the end point only
    return args


_positive, _count = (lambda v: v > 0, "> 0"), (lambda v: v >= 1, ">= 1")
_some, _fid_count = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 2, ">= 2 (FID needs a covariance)")
# What each numeric flag must be; a value outside it is one line: "--lr must be > 0, got 0".
FLAG_RULES = {
    **dict.fromkeys(("steps", "batch_size", "threads", "n_images", "vae_steps", "vae_batch", "sample_batch",
                     "mlp_depth", "mlp_width", "log_every", "vae_width", "latent_channels",
                     "fid_sampling_steps", "final_sampling_steps"), _count),
    **dict.fromkeys(("evals", "heldout_evals", "ckpt_every", "ckpt_minutes", "vae_kl", "lam"), _some),
    **dict.fromkeys(("lr", "grad_clip", "target_scale", "vae_lr"), _positive),
    "fid_n": _fid_count, "fid_ref_n": _fid_count,
    "final_fid_n": (lambda v: v == 0 or v >= 2, ">= 2 (FID needs a covariance), or 0 for none"),
    "heldout_n": (lambda v: v >= HELDOUT_T, f">= {HELDOUT_T} (one image per point of the t grid)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "t_range": (lambda v: 0 <= v[0] < v[1] <= 1, "LO HI with 0 <= LO < HI <= 1 (t = 0 data, t = 1 noise)"),
}


def check(args):
    """Every impossible setting, before any work, as one line each."""
    try:
        args.seeds = [int(v) for v in str(args.seed).split(",")]
    except ValueError:
        raise DemoError(f"--seed {args.seed!r}: need an integer or comma-separated integers") from None
    if len(set(args.seeds)) < len(args.seeds) or not all(0 <= seed < 2**31 for seed in args.seeds):
        raise DemoError(f"--seed {args.seed!r}: need distinct seeds in 0..{2**31 - 1}")
    args.seed = args.seeds[0]
    for name, (ok, need) in FLAG_RULES.items():
        value = getattr(args, name)
        if value is None or (name == "heldout_n" and not args.heldout_evals):
            continue
        if not all(map(math.isfinite, np.atleast_1d(value))):
            raise DemoError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not ok(value):
            shown = " ".join(f"{v:g}" for v in np.atleast_1d(value))
            raise DemoError(f"--{name.replace('_', '-')} must be {need}, got {shown}")
    wanted = args.runs.split(",") if isinstance(args.runs, str) else list(args.runs)
    if not wanted or not set(wanted) <= {"baseline", "sra2"} or len(set(wanted)) < len(wanted):
        raise DemoError(f"--runs {args.runs!r}: need baseline, sra2 or baseline,sra2")
    args.runs = wanted
    world = int(os.environ.get("WORLD_SIZE", "1"))                    # set by torchrun
    if args.batch_size % world:
        raise DemoError(f"--batch-size {args.batch_size} does not split evenly over {world} processes "
                        "(the global batch is shared out across torchrun's ranks)")
    if args.vae_width % 8:
        raise DemoError(f"--vae-width must be a multiple of 8 (GroupNorm groups), got {args.vae_width}")
    if max(args.evals, args.heldout_evals) > args.steps:
        raise DemoError(f"--evals {args.evals} / --heldout-evals {args.heldout_evals}: more than --steps {args.steps}")
    _, _, config = model_config(args)
    args.align_depth = args.align_depth if args.align_depth is not None else config.align_depth
    args.ckpt_fid = fid_name(args.fid_n, args.fid_sampling_steps)
    args.final_fid = fid_name(args.final_fid_n, args.final_sampling_steps)
    if not 1 <= args.align_depth <= config.depth:
        raise DemoError(f"--align-depth {args.align_depth} is beyond {args.model}'s {config.depth} blocks "
                        f"(choose 1..{config.depth})")


def describe(args):
    """The settings that make the run what it is, in one line (printed first)."""
    fid = (f"{args.ckpt_fid} at {args.evals} checkpoints" if args.evals else "no FID checkpoints") + \
        (f", {args.final_fid} at the end" if args.final_fid_n else "")
    heldout = (f"held-out loss on {args.heldout_n} test images at {args.heldout_evals} checkpoints"
               if args.heldout_evals else "no held-out loss")
    return (f"preset {args.preset}: {args.model}, {args.steps} steps of batch {args.batch_size}, lr {args.lr:g}, "
            f"{args.clip} clip {args.grad_clip:g}, seeds {args.seeds}, {', '.join(args.runs)}; {heldout}; {fid}")


def setup(args):
    """Device, precision flags, output folder and log."""
    global LOG_FILE
    try:
        device = sra2.pick_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise DemoError(f"--device {args.device}: {error}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():    # started by torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise DemoError(f"torchrun on {device.type}: use CUDA (NCCL) or --device cpu (gloo)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads is not None and device.type == "cpu":
        # One thread for the quick preset: its ops are small, and OpenMP threads spin-wait for
        # each other, so on a busy machine 2 threads ran it 5x slower than 1 (239 s vs 51 s).
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")                   # TF32 for fp32 matmuls outside
        torch.backends.cudnn.benchmark = True                          # autocast (cuDNN convs: TF32 by default)
    out = Path(args.out)
    try:
        if rank_and_world()[0] == 0:                                   # the other ranks write nothing
            out.mkdir(parents=True, exist_ok=True)
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DemoError(f"cannot create --out/--cache folder ({error})") from None
    rank, world = rank_and_world()
    if rank == 0:                                                      # only rank 0 writes files
        LOG_FILE = out / "log.txt"
        with open(LOG_FILE, "a") as f:                                 # each run's log starts with its command
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: tiny_demo.py {' '.join(args.argv)}\n")
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    card += f" x {world} processes (DDP)" if world > 1 else ""
    return device, out, card


# ---------------------------------------------------------------------------------------------
# Main: stage 1, both runs per seed, then the tables, pictures and results.json
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        check(args)
        device, out, card = setup(args)
        records = demo(args, device, out, card)
        if dist.is_initialized():
            dist.barrier()                                             # no rank tears down while another talks
        return records
    except (DemoError, FileNotFoundError) as error:                    # FileNotFound: Inception weights
        if os.environ.get("RANK", "0") == "0":                         # every rank fails alike; one says so
            print("tiny_demo: error: " + " ".join(str(error).split()), file=sys.stderr)   # one line, always
        raise SystemExit(2)
    finally:
        global LOG_FILE
        LOG_FILE = None
        torch.set_num_threads(threads)                                 # main() may be called in-process
        if dist.is_initialized():
            dist.destroy_process_group()


def demo(args, device, out, card):
    t_start = time.perf_counter()
    quick = "QUICK MODE (smoke test: tiny settings, numbers NOT meaningful)" if args.quick else None
    images, labels, data_desc, data_id = rank0_first(load_data, args)    # rank 0 downloads
    args.data_id = data_id                                                # a resumed run must see the same data
    args.fid_ref_n = min(args.fid_ref_n, len(labels))                        # what the reference really holds; on
                                                                       # every rank, before checkpoints compare it
    if args.batch_size > len(labels):
        raise DemoError(f"--batch-size {args.batch_size} is more than the {len(labels)} training images")
    _, _, config = model_config(args)
    runs = ([row for row in ablation_runs(args, config.depth)] if args.ablate else
            [row for row in [("", "baseline", make_run(args, "baseline", f"{args.model}", False)),
                             ("", "SRA 2", make_run(args, "sra2", f"{args.model} + SRA 2", True))]
             if row[2].name in args.runs])
    check_checkpoints(args, runs, out)                                    # before any work or any write
    say(f"tiny_demo on {card}: {data_desc}" + (f"\n{quick}" if quick else ""), describe(args))
    if device.type == "cpu" and args.preset == "full":
        say("note: no GPU in use: the full demo on a CPU takes many hours; --preset cpu is made for two cores")
    # FID on rank 0 only; it fails early without weights.
    uses_fid = args.evals > 0 or args.final_fid_n > 0
    fid_meter = FIDMeter(args, images, data_id, device) if rank_and_world()[0] == 0 and uses_fid else None
    stage = rank0_first(stage1, images, data_id, args, device)            # rank 0 trains, the others read
    stage.heldout = heldout_set(args, stage, device) if args.heldout_evals else None

    # The floor: FIDs of decoded real latents, i.e. of a perfect diffusion model behind this decoder.
    n_floor = max(args.fid_n if args.evals else 2, args.final_fid_n, min(50, len(images)))
    recon = torch.cat([decode(stage, z.to(device)) for z in stage.latents[0, :n_floor].split(args.sample_batch)])
    floor = dict(ckpt=from_rank0(fid_meter, recon[:args.fid_n]) if args.evals else None,
                 final=from_rank0(fid_meter, recon[:args.final_fid_n]) if args.final_fid_n else None)
    n_show = min(50, len(recon))
    if rank_and_world()[0] == 0:
        panels(out / "vae_reconstructions.png",
               [("real", images[:n_show]), ("VAE reconstruction", recon[:n_show].numpy())],
               f"stage 1: VAE 32x32x3 -> 16x16x{args.latent_channels} -> 32x32x3")
    if uses_fid:
        parts = [f"{name} {value:.2f}" for name, value in ((args.ckpt_fid, floor["ckpt"]),
                                                           (args.final_fid, floor["final"])) if value is not None]
        say("VAE reconstruction floor: " + ", ".join(parts))

    records = {}                                                       # (run name, seed) -> record
    for seed in args.seeds:
        args.seed = seed
        for _, _, run in runs:
            if (run.name, seed) not in records:
                records[run.name, seed] = train_run(run, stage, labels, args, device, fid_meter, out)
    args.seed = args.seeds[0]
    if rank_and_world()[0] == 0:                                       # only rank 0 writes
        report(args, runs, records, floor, stage, out, card, data_desc, quick, time.perf_counter() - t_start)
    return records


def report(args, runs, records, floor, stage, out, card, data_desc, quick, total_seconds):
    """Print and save the tables (table.txt), every number (results.json) and the pictures."""
    lines = [f"tiny_demo results, {time.strftime('%Y-%m-%d %H:%M')}, on {card}"] + ([quick] if quick else [])
    lines += [f"data: {data_desc}",
              f"stage 2: {args.model}, {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr:g}, "
              f"grad clip {args.grad_clip:g}, EMA warm-up capped at {args.ema_decay:g}, seeds {args.seeds}, compile {args.compile}",
              f"SRA 2: {make_run(args, 'sra2', '', True).settings}" + (" (the default; Table 1 varies it)" if args.ablate else ""),
              f"stage 1: VAE width {args.vae_width}, {args.latent_channels} latent channels, KL {args.vae_kl:g}, "
              f"{args.vae_steps} steps of batch {args.vae_batch}, lr {args.vae_lr:g}",
              f"protocol: checkpoints FID-{args.fid_n} ({args.fid_sampling_steps}-step SDE), final FID-{args.final_fid_n} "
              f"({args.final_sampling_steps}-step SDE), EMA weights, no CFG, vs {args.fid_ref_n} training images, "
              f"tf convention", ""]
    speedups = {}                                                      # seed -> fraction of steps, or None
    if args.ablate:
        lines += table1_lines(args, runs, records)
    else:
        names = [run.name for _, _, run in runs]
        lines += table2_lines(args, records, names, floor)
        for seed in args.seeds:
            if args.heldout_evals:
                lines += ["", f"held-out loss (denoising term on {args.heldout_n} test images, fixed t grid and noise, "
                              f"EMA weights), seed {seed}"] + heldout_table([records[n, seed] for n in names])
        if args.heldout_evals and len(args.seeds) > 1:
            lines += ["", f"held-out loss, mean over seeds {args.seeds}"]
            lines += heldout_table([mean_heldout([records[n, x] for x in args.seeds]) for n in names])
        base_name, sra_name = "baseline", "sra2"
        for seed in args.seeds if names == [base_name, sra_name] else []:
            base, sra = records[base_name, seed], records[sra_name, seed]
            lines += ["", f"  time per step: SRA 2 {100 * (sra['wall'] / base['wall'] - 1):+.1f}% against the "
                          f"baseline, seed {seed} (the first step of each run, compile and start-up, is not timed)",
                             f"  gradient norm above the clip {args.grad_clip:g} ({args.clip} clipping): baseline "
                             f"{base.get('clipped', 0)}, SRA 2 {sra.get('clipped', 0)} of {args.steps} steps"]
            if not args.evals:
                continue
            lines += ["", f"{args.ckpt_fid} at the checkpoints, seed {seed}"]
            lines += table(["step", "baseline FID", "train time", "SRA 2 FID", "train time"],
                           [[b["step"], f"{b['fid']:.2f}", fmt_time(b["wall"]), f"{a['fid']:.2f}", fmt_time(a["wall"])]
                            for b, a in zip(base["evals"], sra["evals"])])
            text, speedups[seed] = speedup_lines(base, sra, args)
            lines += [""] + text
        if len(args.seeds) > 1 and args.evals and names == [base_name, sra_name]:   # a claim needs two seeds
            text, speedups["mean"] = speedup_lines(*(mean_record([records[name, x] for x in args.seeds])
                                                     for name in (base_name, sra_name)), args)
            lines += [""] + text
        pictures(args, records, names, out, quick)
    lines += ["", f"total wall time {fmt_time(total_seconds)} (stage 1 took {fmt_time(stage.seconds)} when "
                  "it was not cached)"]
    say("", *lines)
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    runs_json = [{k: v for k, v in r.items() if k not in ("grids", "final_grid")} for r in records.values()]
    results = dict(settings=vars(args), card=card, machine=machine(), data=data_desc, floor=floor,
                   total_seconds=total_seconds, step_fraction_to_baseline_fid=speedups, runs=runs_json)
    atomic_save(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1, default=str)))


def table2_lines(args, records, names, floor):
    """Table 2 of the paper in miniature: one row per run and seed, means, and the decoder's floor."""
    rows, last_fid = [], lambda r: r["evals"][-1]["fid"] if r["evals"] else None
    for seed in args.seeds:
        for r in (records[name, seed] for name in names):
            aligned = r["projector_params"] > 0
            rows.append([f"+ SRA 2 (block {args.align_depth})" if aligned else r["label"],
                         fmt_params(r["params"]) + (f" + {fmt_params(r['projector_params'])} P" if aligned else ""),
                         fmt_steps(args.steps), seed, fmt_time(r["wall"]), f"{r['log'][-1]['denoise']:.4f}",
                         f"{r['log'][-1]['align']:.4f}" if aligned else "-",
                         fmt_fid(last_fid(r)), fmt_fid(r["final_fid"])])
    mean_or_none = lambda values: None if None in values else mean(values)
    if len(args.seeds) > 1:
        for name in names:
            recs = [records[name, seed] for seed in args.seeds]
            rows.append([f"{args.model if name == 'baseline' else '+ SRA 2'} (mean)", "", fmt_steps(args.steps), "all",
                         fmt_time(mean(r["wall"] for r in recs)), "", "",
                         fmt_fid(mean_or_none([last_fid(r) for r in recs])),
                         fmt_fid(mean_or_none([r["final_fid"] for r in recs]))])
    if floor["ckpt"] is not None or floor["final"] is not None:
        rows.append(["VAE reconstruction floor", "", "", "", "", "", "", fmt_fid(floor["ckpt"]), fmt_fid(floor["final"])])
    return (["Table 2 in miniature (no CFG; P is dropped at inference, so both sample with the same SiT)"] +
            table(["model", "params", "iters", "seed", "train time", "denoise", "align", args.ckpt_fid, args.final_fid],
                  rows))


def heldout_table(recs):
    """Held-out loss at each checkpoint for each run (and SRA 2 against the baseline when both are
    there), then the noise bands at the last checkpoint."""
    both = len(recs) == 2
    head = ["step"] + [r["label"] for r in recs] + (["SRA 2 - baseline"] if both else [])
    rel = lambda a, b: f"{100 * (b / a - 1):+.2f}%"
    rows = [[es[0]["step"]] + [f"{e['loss']:.4f}" for e in es] + ([rel(es[0]["loss"], es[1]["loss"])] if both else [])
            for es in zip(*(r["heldout"] for r in recs))]
    bands = [[f"  t band {band}"] + [f"{r['heldout'][-1][band]:.4f}" for r in recs]
             + ([rel(recs[0]["heldout"][-1][band], recs[1]["heldout"][-1][band])] if both else [])
             for band in HELDOUT_BANDS]
    return table(head, rows + bands)


def mean_heldout(recs):
    """The seeds' average held-out curve, checkpoint by checkpoint."""
    return dict(label=recs[0]["label"], heldout=[
        dict(step=es[0]["step"], **{k: mean(e[k] for e in es) for k in ("loss", *HELDOUT_BANDS)})
        for es in zip(*(r["heldout"] for r in recs))])


def table1_lines(args, runs, records):
    """Table 1 of the paper in miniature: one row per design choice, averaged over the seeds."""
    rows = []
    for group, setting, run in runs:
        recs = [records[run.name, seed] for seed in args.seeds]
        rows.append([group, setting, f"{mean(r['evals'][-1]['fid'] for r in recs):.2f}" if args.evals else "-",
                     fmt_fid(None if None in [r["final_fid"] for r in recs] else mean(r["final_fid"] for r in recs)), f"{mean(r['log'][-1]['denoise'] for r in recs):.4f}",
                     f"{mean(r['log'][-1]['align'] for r in recs):.4f}" if run.align else "-",
                     f"{args.steps / mean(r['wall'] for r in recs):.1f}"])
    return ([f"Table 1 in miniature ({args.model}, {args.steps} steps, mean over seeds {args.seeds})"] +
            table(["design", "setting", args.ckpt_fid, args.final_fid, "denoise", "align", "it/s"], rows))


def pictures(args, records, names, out, quick):
    """FID vs steps and vs wall-clock, loss curves, held-out loss, and the matched sample grids of
    the first seed."""
    tag = lambda r: r["label"] + (f" (seed {r['seed']})" if len(args.seeds) > 1 else "")
    runs = [records[name, seed] for seed in args.seeds for name in names]
    curve = lambda r, x, y, key="evals": [tag(r), [e[x] for e in r[key]], [e[y] for e in r[key]]]
    title = f"{args.ckpt_fid} (SDE, EMA) of {args.model} on 16x16x{args.latent_channels} latents"
    if args.evals:
        line_chart(out / "fid_vs_steps.png", [curve(r, "step", "fid") for r in runs], title,
                   "training steps", "FID (log scale)", logy=True, note=quick)
        line_chart(out / "fid_vs_time.png", [curve(r, "wall", "fid") for r in runs], title,
                   "training wall-clock (s, evaluations excluded)", "FID (log scale)", logy=True, note=quick)
    if args.heldout_evals:
        line_chart(out / "heldout_loss.png", [curve(r, "step", "loss", "heldout") for r in runs],
                   f"held-out denoising loss, {args.heldout_n} test images (EMA)", "training steps",
                   "loss (log scale)", logy=True, note=quick)
    losses = []
    for r in runs:
        losses.append(curve(r, "step", "denoise", "log"))
        losses[-1][0] += ": denoise"
        if r["projector_params"]:
            losses.append(curve(r, "step", "align", "log"))
            losses[-1][0] += ": align"
    line_chart(out / "loss_curves.png", losses, f"training losses (mean over {args.log_every} steps)",
               "training steps", "loss (log scale)", logy=True, note=quick)
    if names != ["baseline", "sra2"]:
        return
    base, sra = records["baseline", args.seeds[0]], records["sra2", args.seeds[0]]
    tail = f"  [{quick}]" if quick else ""
    for b, a in zip(base["evals"], sra["evals"]):
        panels(out / f"samples_step{b['step']:06d}.png",
               [(f"baseline, {args.ckpt_fid} {b['fid']:.1f}", base["grids"][b["step"]].numpy()),
                (f"SRA 2, {args.ckpt_fid} {a['fid']:.1f}", sra["grids"][a["step"]].numpy())],
               f"step {b['step']}: same noise, same labels (image i has class i % 10)" + tail)
    if args.final_fid_n:
        panels(out / "samples_final.png",
               [(f"baseline, {args.final_fid} {base['final_fid']:.1f}", base["final_grid"].numpy()),
                (f"SRA 2, {args.final_fid} {sra['final_fid']:.1f}", sra["final_grid"].numpy())],
               f"step {args.steps}, {args.final_sampling_steps}-step SDE" + tail)


if __name__ == "__main__":
    main()
