"""FID and Inception Score with the numbers the field trusts: torch, numpy and pillow only.

Network: the TF "inception-2015-12-05" graph as pytorch-fid ports it (InceptionV3 with TF's
quirks: BatchNorm eps 0.001 and no BN scale, 3x3 average pools that exclude the zero padding in
Mixed_5*/6b-e/7b, a max pool in Mixed_7c's pool branch). Features are the 2048-d "pool3" average of
Mixed_7c; the 1008-way `fc` gives the Inception Score logits.
Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (downloaded once into
~/.cache/sra2, SHA-256 checked), or any local copy, also one saved without `fc` (then FID works
and Inception Score does not).

Two preprocessing conventions; they differ by ~24% per image at 32 px, ~14% at 64 px and ~0.3% at
299 px, so every FID this file prints names its convention:
  "tf" (default)  the papers' evaluators (ADM's TF graph, NVIDIA's detector in StyleGAN/EDM):
                  uint8 as float in [0, 255], TF1 bilinear resize to 299 (src = dst * in/out, no
                  half-pixel centers, edge clamped), then (x - 128) / 128.
  "pytorch-fid"   pytorch-fid 0.3: x / 255, F.interpolate(bilinear, align_corners=False) to 299,
                  then 2x - 1.
Both reproduce oracle features saved from the real tools: tested to 1e-4,
measured 4e-6 relative L2 per image at 32, 64 and 299 px.

FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) over pool3 statistics (mu, S = Sigma), in float64.
IS  = exp(E_x KL(p(y|x) || p(y))), p = softmax of the 1008 logits WITHOUT the fc bias (as ADM,
      NVIDIA and torch-fidelity do), over 10 splits, mean and std.

Shapes: N batch, C = 3 channels, H, W image size, D = 2048 features, K = 1008 classes.
Start reading at compute_statistics, then frechet_distance. CLI: `python fid.py PATH1 PATH2`.
"""

import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sra2

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# torch.hub names files by the first 8 hex digits of their SHA-256 ("6726825d"); the full digest
# is the one other FID tools pin for this URL (95,628,359 bytes). Not re-hashed here: no network.
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "SRA2_INCEPTION_WEIGHTS"
CONVENTIONS = ("tf", "pytorch-fid")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


# ----------------------------------------------------------------------------------------------
# Script utilities (tiny_demo.py uses them too): time, a progress line, atomic files, one-line errors

def fmt_time(seconds):
    """3.2s, 42s, 7m05s."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A status line with rate and time left: redrawn in place on a terminal, else one line every
    15 s (logs stay short). `elapsed` may be passed in, so pauses (evaluations) don't count. Only
    rank 0 of a torch.distributed job prints. `file`: default stdout."""

    def __init__(self, label, total, unit="it", *, file=None):
        self.label, self.total, self.unit, self.file = label, total, unit, file or sys.stdout
        self.start = self.last = time.perf_counter()
        self.tty, self.shown = self.file.isatty(), False

    def update(self, done, note="", elapsed=None, force=False):
        now = time.perf_counter()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # one progress line, not one per GPU
        if not force and done < self.total and now - self.last < (0.5 if self.tty else 15):
            return
        self.last = now
        elapsed = now - self.start if elapsed is None else elapsed
        rate = done / max(elapsed, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0
        line = (f"{self.label} {done}/{self.total}  {rate:.1f} {self.unit}/s  "
                f"{fmt_time(left)} left  {note}").rstrip()
        if self.tty:
            print("\r" + line.ljust(100)[:160], end="", file=self.file, flush=True)
        else:
            print(line, file=self.file, flush=True)
        self.shown = True

    def close(self):
        if self.shown and self.tty:
            print(file=self.file, flush=True)


def atomic_write(path, write):
    """write(tmp_path), then os.replace onto `path` (atomic on one filesystem): an interruption or
    an error never leaves a half-written file under the real name. The temp name keeps the suffix
    (np.savez would append .npz otherwise); the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line, `prog: error: message`, and exit status 2
    (argparse's own error prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------------------
# The FID Inception network (pytorch-fid's FIDInceptionA/C/E_1/E_2; parameter names match its file)

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, TF's) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TF's average pool divides by the number of real pixels, not 9: torchvision's default
    # (count_include_pad=True) is the classic porting bug that shifts FID.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d at 35x35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool_3x3(x))], dim=1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):  # Mixed_6b..e at 17x17, factorized 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):  # Mixed_7b (pool="avg") and Mixed_7c (pool="max") at 8x8
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], dim=1)
        # The TF graph max-pools in the last block (likely a bug upstream, but it is what the
        # published FIDs were computed with).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), b3, d3, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """Input: (N, 3, 299, 299) float32 from `preprocess`. Output: pool3 features (N, D=2048) and
    logits (N, K=1008) WITHOUT the fc bias (what Inception Score uses), or None without `fc`."""

    def __init__(self, with_fc=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, pool="avg"), InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008) if with_fc else None  # bias is loaded but never used

    def forward(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"expected a preprocessed (N, 3, 299, 299) batch, got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                      # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                      # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                    # (N, 288, 35, 35)
        x = self.Mixed_6a(x)                                                  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))     # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                    # (N, 2048, 8, 8)
        features = x.mean(dim=(2, 3))                                         # (N, D) pool3
        logits = None if self.fc is None else features @ self.fc.weight.T     # (N, K), no bias
        return features, logits


# ----------------------------------------------------------------------------------------------
# Weights: argument, then $SRA2_INCEPTION_WEIGHTS, then the cache, then one download

def _cache_path():
    return Path.home() / ".cache" / "sra2" / "pt_inception-2015-12-05-6726825d.pth"


def _download(url, dest, sha256):
    """Fetch url to dest, SHA-256 checked; a wrong or half-written file never appears as dest."""
    def fetch(tmp):
        digest = hashlib.sha256()
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"SHA-256 of {url} is {digest.hexdigest()}, expected {sha256}")
    return atomic_write(dest, fetch)


def _resolve_weights(weights=None):
    if weights is not None:
        return Path(weights)
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV])
    cached = _cache_path()
    if cached.is_file():
        return cached
    try:
        print(f"downloading FID Inception weights to {cached}", file=sys.stderr)
        return _download(FID_WEIGHTS_URL, cached, FID_WEIGHTS_SHA256)
    except Exception as error:
        raise FileNotFoundError(
            f"no FID Inception weights ({error}): pass a local copy of "
            f"pt_inception-2015-12-05-6726825d.pth with --weights (fid.py) or --inception "
            f"(tiny_demo.py), set {WEIGHTS_ENV}=/path/to/file, or put it at {cached}"
        ) from error


def _check_device(device):
    """torch.device(device) if fid.py can run there (cpu, cuda[:N] or mps present here), else ValueError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': MPS is not available on this machine")
    return device


def load_inception(weights=None, device="cpu"):
    """The FID Inception network in eval mode, float32, on `device`. `weights`: a .pth path (the
    full pytorch-fid file, or the -nofc / -nofc-fp16 files), or None to resolve it as above.
    A missing file is a FileNotFoundError; any other file a ValueError naming it."""
    device = _check_device(device)
    path = _resolve_weights(weights)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # unused head
        model = FIDInceptionV3(with_fc="fc.weight" in state)
        model.load_state_dict(state)  # strict; an fp16 file is cast up by the float32 parameters
    except Exception as error:  # not a torch file, truncated, not a state dict, other weights
        detail = " ".join(str(error).split())  # load_state_dict's message spans lines
        detail = detail if len(detail) <= 160 else detail[:160] + " ..."
        raise ValueError(f"{path}: not the FID Inception weights ({type(error).__name__}: {detail})") from error
    # channels_last: oneDNN's native layout, 1.5x faster on CPU; same features to 1e-6.
    model = model.to(device=device, dtype=torch.float32, memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Preprocessing: uint8 images -> (N, 3, 299, 299) float32 network input

def _as_nchw_uint8(images):
    """uint8 (N, H, W, 3) or (N, 3, H, W), numpy or torch -> uint8 (N, 3, H, W) tensor.
    A shape with 3 in both places, (N, 3, H, 3), is read as NCHW."""
    if isinstance(images, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (from PIL, mmap) are fine: never written
            warnings.simplefilter("ignore", UserWarning)
            images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"images must be RGB with 3 channels, (N, H, W, 3) or (N, 3, H, W); "
                         f"got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    return images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)


def _tf1_resize_matrix(size_in, size_out, device):
    """(size_out, size_in) weights of TF1 bilinear resize (align_corners=False,
    half_pixel_centers=False): src = dst * in/out, neighbours floor(src) and floor(src)+1 clamped."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo
    rows = torch.arange(size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


def preprocess(images, convention="tf"):
    """uint8 images (N, 3, H, W) (or NHWC, numpy) -> float32 (N, 3, 299, 299) on their device."""
    x = _as_nchw_uint8(images).float()
    if convention == "tf":
        resize_h = _tf1_resize_matrix(x.shape[2], 299, x.device)  # (299, H)
        resize_w = _tf1_resize_matrix(x.shape[3], 299, x.device)  # (299, W)
        x = resize_h @ x @ resize_w.T                             # (N, 3, 299, 299)
        return (x - 128) / 128
    if convention == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


# ----------------------------------------------------------------------------------------------
# Statistics

class FeatureStats:
    """Streaming mean and covariance of features in float64 with constant memory (D + D^2 sums).
    Sums are of (f - shift), shift = the first batch's mean, so that E[f f^T] - mu mu^T does not
    cancel away digits. They live on the features' device: the D x D update is fast on a GPU."""

    def __init__(self):
        self.n, self.shift, self.sum, self.sum_outer = 0, None, None, None

    def update(self, features):
        f = torch.as_tensor(features)
        if f.device.type == "mps":  # MPS has no float64
            f = f.cpu()
        f = f.to(torch.float64)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"features must be a non-empty (N, D) array, got shape {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or Inf")
        if self.shift is None:
            self.shift = f.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.sum_outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        elif f.shape[1] != self.shift.shape[0]:
            raise ValueError(f"features have D = {f.shape[1]}, earlier ones D = {self.shift.shape[0]}")
        centred = f.to(self.shift.device) - self.shift  # (N, D)
        self.n += f.shape[0]
        self.sum += centred.sum(dim=0)
        self.sum_outer += centred.T @ centred           # (D, D)

    def mean_cov(self):
        """(mu (D,), sigma (D, D)) as float64 numpy; sigma is unbiased (divides by N - 1)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mean_centred = self.sum / self.n
        mu = self.shift + mean_centred
        sigma = (self.sum_outer - self.n * torch.outer(mean_centred, mean_centred)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


@contextlib.contextmanager
def _full_float32():
    """TF32 (and oneDNN's bf16/tf32 modes on CPU) off, restored afterwards: FID must not depend on
    which chip computed it. Newer torch refuses to mix its two flag APIs, so use one of them."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision") and hasattr(backends.cudnn, "conv"):
        layers = [backends.cuda.matmul, backends.cudnn.conv]
        layers += [getattr(backends.mkldnn, op) for op in ("matmul", "conv")
                   if hasattr(backends.mkldnn, op)]
        flags = [(layer, "fp32_precision", "ieee") for layer in layers]
    else:
        flags = [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]
    saved_precision, saved = torch.get_float32_matmul_precision(), [getattr(o, n) for o, n, _ in flags]
    try:
        torch.set_float32_matmul_precision("highest")
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        torch.set_float32_matmul_precision(saved_precision)
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


def _batches(images, batch_size):
    """Yield uint8 NCHW tensors of at most batch_size images from an array or an iterable of them."""
    for batch in ([images] if isinstance(images, (np.ndarray, torch.Tensor)) else images):
        batch = _as_nchw_uint8(batch)
        yield from batch.split(batch_size)


def _print_progress(n, total, seconds, done=False):
    rate = n / seconds
    tail = (f", {seconds:.0f} s in all\n" if done else
            f", {(total - n) / rate:.0f} s left  " if total else "  ")
    print(f"\rInception features: {n}/{total or '?'} images, {rate:.1f} img/s{tail}",
          end="", file=sys.stderr, flush=True)


def compute_statistics(images, model=None, batch_size=200, device=None, convention="tf",
                       weights=None, progress=False, return_is_logits=False, total=None):
    """Pool3 statistics (mu (D,), sigma (D, D)) float64 of uint8 RGB images.

    images: uint8 (N, H, W, 3) or (N, 3, H, W), numpy or torch, or an iterable yielding such
            batches (sizes may vary), so generated images can be streamed. Needs N >= 2.
    model:  from load_inception (else loaded from `weights`); device: where images are sent,
            default the model's. progress: a line on stderr with rate and time left (`total`
            = expected N for iterables). return_is_logits: also return the (N, K) float32 logits
            for inception_score (needs the weights with `fc`).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total = _as_nchw_uint8(images).shape[0]  # checks dtype, layout, emptiness before any work
        if total < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {total}")
    if model is None:
        model = load_inception(weights, device or "cpu")
    device = _check_device(device) if device else next(model.parameters()).device
    if return_is_logits and getattr(model, "fc", None) is None:
        raise ValueError("Inception Score needs the weights with the 1008-way fc layer "
                         "(pt_inception-2015-12-05-6726825d.pth); the -nofc files give features only")
    stats, all_logits = FeatureStats(), []
    start = last_print = time.time()
    # autocast off: a caller's bf16 context must not leak into the features.
    with torch.no_grad(), _full_float32(), torch.autocast(torch.device(device).type, enabled=False):
        for batch in _batches(images, batch_size):
            features, logits = model(preprocess(batch.to(device), convention))
            stats.update(features)
            if return_is_logits:
                all_logits.append(logits.float().cpu().numpy())
            if progress and time.time() - last_print > 1:  # quiet unless extraction is long
                last_print = time.time()
                _print_progress(stats.n, total, last_print - start)
    if progress and last_print > start:
        _print_progress(stats.n, total, time.time() - start, done=True)
    if stats.n == 0:
        raise ValueError("no images were given")
    mu, sigma = stats.mean_cov()
    return (mu, sigma, np.concatenate(all_logits)) if return_is_logits else (mu, sigma)


def _read_image(file, decode=True):
    """(H, W, 3) uint8 RGB array of an image file, or with decode=False its (W, H) from the header."""
    from PIL import Image  # pillow only needed for folders
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB")) if decode else image.size
    except Exception as error:  # not an image, truncated, unreadable
        raise ValueError(f"{file}: not a readable image ({type(error).__name__}: {error})") from error


def _image_files(path):
    """Sorted image files directly in folder `path` (other files are ignored), each opened (header
    only) to check that it is an image of the first one's size: an error names the first bad file."""
    path = Path(path)
    if not path.is_dir():
        raise (NotADirectoryError(f"{path}: not a folder") if path.exists() else
               FileNotFoundError(f"{path}: no such file or directory"))
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path}")
    w, h = _read_image(files[0], decode=False)
    for file in files[1:]:
        if (size := _read_image(file, decode=False)) != (w, h):
            raise ValueError(f"{file} is {size[0]}x{size[1]} but {files[0]} is {w}x{h}: a folder's "
                             f"images must have one size (resize them first)")
    return files


def _folder_batches(files, batch_size):
    for start in range(0, len(files), batch_size):
        yield np.stack([_read_image(file) for file in files[start:start + batch_size]])


def statistics_from_folder(path, batch_size=200, **kwargs):
    """compute_statistics over the image files directly in folder `path`, in sorted order. All must
    have one size: FID over mixed sizes would mix what resizing to 299 does to each (see the top)."""
    files = _image_files(path)
    return compute_statistics(_folder_batches(files, batch_size), batch_size=batch_size,
                              total=len(files), **kwargs)


def _check_stats(mu, sigma, name="statistics"):
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu or sigma contains NaN or Inf")
    return mu, sigma


def save_statistics(path, mu, sigma, convention=None):
    """Write .npz with keys mu, sigma (what pytorch-fid reads), plus the convention if known; like
    np.savez, ".npz" is appended if missing. Atomic: an existing file is only ever replaced by a
    complete one."""
    mu, sigma = _check_stats(mu, sigma)
    extra = {} if convention is None else {"convention": np.array(convention)}
    path = Path(path if str(path).endswith(".npz") else f"{path}.npz")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such folder to save {path.name} in")

    def write(tmp):
        with open(tmp, "wb") as file:
            np.savez(file, mu=mu, sigma=sigma, **extra)
    atomic_write(path, write)


def _load_npz(path):
    """(mu, sigma, convention or None) from an .npz with keys mu and sigma (ours, pytorch-fid's, ADM's)."""
    try:
        with open(path, "rb") as file:
            if file.read(2) != b"PK":  # else np.load would try it as .npy, then as a pickle
                raise ValueError("not a zip archive")
        with np.load(path) as data:  # allow_pickle=False: never runs code from the file
            keys = data.files
            arrays = {key: data[key] for key in ("mu", "sigma", "convention") if key in keys}
    except FileNotFoundError:
        raise
    except Exception as error:  # not a zip, truncated, a corrupt member, a pickled array
        raise ValueError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from error
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path} needs keys 'mu' and 'sigma', has {keys}")
    convention = str(arrays["convention"]) if "convention" in arrays else None
    return (*_check_stats(arrays["mu"], arrays["sigma"], name=str(path)), convention)


def load_statistics(path):
    """(mu, sigma) float64 from an .npz with keys mu and sigma (ours, pytorch-fid's, ADM's)."""
    return _load_npz(path)[:2]


# ----------------------------------------------------------------------------------------------
# Distances and scores

def psd_factor(sigma, name="sigma"):
    """C (D, R) with sigma = C C^T, from eigh: C = V W^(1/2) over the R eigenvalues that are not
    rounding noise (sqrt would turn each 1e-16 into 1e-8). Checks symmetric and PSD."""
    if np.abs(sigma - sigma.T).max() > 1e-6 * max(1.0, np.abs(sigma).max()):
        raise ValueError(f"{name} is not symmetric, so it is no covariance")
    w, v = np.linalg.eigh(sigma)
    if w.min() < -1e-6 * max(1.0, w.max()):  # the sqrtm formula would see an imaginary part > 1e-3
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {w.min():.3g})")
    keep = w > len(w) * np.finfo(np.float64).eps * np.abs(w).max()
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64.

    With S1 = C1 C1^T and S2 = C2 C2^T, S1 S2 has the non-zero eigenvalues of (C2^T C1)^T (C2^T C1),
    so tr((S1 S2)^(1/2)) = the sum of the singular values of C2^T C1. Exact for symmetric PSD
    covariances, no square roots of rounding noise (the squared-matrix route loses 1e-8 per
    direction), fine when S1 S2 is singular (N < D), ~2x faster than scipy's sqrtm at D = 2048.
    Agrees with pytorch-fid's scipy-sqrtm formula to 1e-6 relative (tested).
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "stats 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "stats 2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    cross = psd_factor(sigma2, "sigma2").T @ psd_factor(sigma1, "sigma1")  # C2^T C1, (R2, R1)
    tr_covmean = np.linalg.svd(cross, compute_uv=False).sum()                # tr((S1 S2)^(1/2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """(mean, std) over `splits` equal parts of exp(mean_x KL(p(y|x) || p(y))), p(y|x) = softmax of
    the (N, K=1008) logits computed without the fc bias (what compute_statistics returns)."""
    logits = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float64)
    if logits.ndim != 2 or logits.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, K) logits with N >= splits = {splits}, got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or Inf")
    log_p = torch.log_softmax(logits, dim=1)  # log p(y|x), (N, K)
    n, scores = logits.shape[0], []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_p_y = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y), (K,)
        kl = (part.exp() * (part - log_p_y)).sum(dim=1)                  # (N / splits,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# CLI, like pytorch-fid's

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _check_paths(args):
    """Every path problem before any work: inputs are folders or .npz files; --save-stats reads a
    folder and writes an .npz into a folder that exists."""
    for path in args.path[:1] if args.save_stats else args.path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        if not (os.path.isdir(path) or path.endswith(".npz")):
            raise ValueError(f"{path}: neither an image folder nor an .npz file")
    if args.save_stats:
        source, out = args.path
        if not os.path.isdir(source):
            raise ValueError(f"--save-stats computes the statistics of an image folder; {source} is a file")
        if not out.endswith(".npz") or os.path.isdir(out):
            raise ValueError(f"--save-stats writes an .npz file; {out} is not an .npz file name")
        if not os.path.isdir(os.path.dirname(out) or "."):
            raise FileNotFoundError(f"{os.path.dirname(out)}: no such folder to save {os.path.basename(out)} in")


def _run(args):
    _check_device(args.device)
    _check_paths(args)
    inputs = args.path[:1] if args.save_stats else args.path
    # The cheap checks of every input (whole .npz files, image headers) come before the network.
    stats = {path: _load_npz(path) for path in inputs if not os.path.isdir(path)}
    folders = {path: _image_files(path) for path in inputs if os.path.isdir(path)}
    model = load_inception(args.weights, args.device) if folders else None
    for path, files in folders.items():
        mu, sigma = compute_statistics(_folder_batches(files, args.batch_size), model=model,
                                       batch_size=args.batch_size, device=args.device,
                                       convention=args.convention, progress=True, total=len(files))
        stats[path] = mu, sigma, args.convention
    if args.save_stats:
        mu, sigma, convention = stats[args.path[0]]
        save_statistics(args.path[1], mu, sigma, convention)
        print(f"saved statistics ({convention} convention) to {args.path[1]}")
        return None
    (mu1, sigma1, conv1), (mu2, sigma2, conv2) = (stats[path] for path in args.path)
    if conv1 and conv2 and conv1 != conv2:
        raise ValueError(f"the two statistics use different conventions ({conv1} vs {conv2}): "
                         f"FID is meaningless")
    fid = frechet_distance(mu1, sigma1, mu2, sigma2)
    print(f"FID ({conv1 or conv2 or 'unknown'} convention): {fid:.4f}")
    return fid


def main(argv=None):
    parser = OneLineParser(prog="fid.py", description="FID between two image folders or .npz statistics")
    parser.add_argument("path", nargs=2, help="image folders or .npz files with mu and sigma")
    parser.add_argument("--save-stats", action="store_true",
                        help="compute statistics of folder PATH1 and save them to PATH2 (.npz)")
    parser.add_argument("--batch-size", type=_positive_int, default=200)
    parser.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    parser.add_argument("--convention", choices=CONVENTIONS, default="tf")
    parser.add_argument("--weights", default=None, help=f"Inception .pth (default: ${WEIGHTS_ENV} or cache)")
    args = parser.parse_args(argv)
    args.device = args.device or str(sra2.pick_device())
    try:
        return _run(args)
    except (OSError, ValueError) as error:  # bad input: one line naming it, no traceback
        parser.error(" ".join(str(error).split()))


if __name__ == "__main__":
    main()
