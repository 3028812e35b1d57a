"""FID and Inception Score with the numbers the field trusts: torch, numpy and pillow only.

Network: TF's "inception-2015-12-05" graph as pytorch-fid ports it, quirks included: the 2048-d
pool3 features of Mixed_7c, and the 1008-way fc without its bias for Inception Score. Weights:
pytorch-fid's .pth, downloaded once into ~/.cache/sra2 (SHA-256 checked) or a local copy.
Preprocessing: two conventions, ~24% apart per image at 32 px, ~14% at 64 px, ~0.3% at 299 px, so
every FID printed names its own. Both match features saved from the real tools (tested to 1e-4).
  "tf" (default)  the papers' evaluators (ADM, StyleGAN/EDM): uint8 as float, TF1 bilinear resize
                  to 299 (src = dst * in/out, no half-pixel centers, edges clamped), (x - 128) / 128
  "pytorch-fid"   x / 255, F.interpolate(bilinear, align_corners=False) to 299, then 2x - 1
FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) over pool3 statistics (mu, S), in float64.
IS  = exp(E_x KL(p(y|x) || p(y))) over 10 splits (as ADM, NVIDIA, torch-fidelity), mean and std.
Shapes: N batch, H W image size, D = 2048 features, K = 1008 classes. Start reading at
compute_statistics, then frechet_distance. CLI: `python fid.py PATH1 PATH2`, FID only.
"""
import argparse
import contextlib
import hashlib
import os
import sys
import time
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sra2

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
# the SHA-256 other FID tools pin for this URL (95,628,359 bytes); torch.hub's name has 8 digits
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "SRA2_INCEPTION_WEIGHTS"
CONVENTIONS = ("tf", "pytorch-fid")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def _require(ok, message, error=ValueError):
    if not ok:
        raise error(message)


# ----------------------------------------------------------------------------------------------
# Script utilities (tiny_demo.py uses them too): time, progress line, atomic files, one-line errors

def fmt_time(seconds):
    """3.2s, 42s, 7m05s, 2h05m, 240h."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s"
    seconds = round(seconds)
    if seconds >= 36000:
        return f"{round(seconds / 3600)}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A status line with rate and time left, in place on a terminal, else every 15 s and at the
    end (total None: unknown), on rank 0 only (torch.distributed). `elapsed` leaves pauses out."""
    def __init__(self, label, total, unit="it", *, file=None):
        self.label, self.total, self.unit, self.file = label, total, unit, file or sys.stdout
        self.start = self.last = time.perf_counter()
        self.tty, self.shown = self.file.isatty(), False

    def update(self, done, note="", elapsed=None, force=False):
        now, dist = time.perf_counter(), torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return  # one progress line, not one per GPU
        finished = self.total is not None and done >= self.total
        if not (force or finished) and now - self.last < (0.5 if self.tty else 15):
            return
        self.last, elapsed = now, now - self.start if elapsed is None else elapsed
        rate, total = done / max(elapsed, 1e-9), "?" if self.total is None else self.total
        left = f"{fmt_time((total - done) / rate)} left" if rate and total != "?" else ""
        line = f"{self.label} {done}/{total}  {rate:.1f} {self.unit}/s  {left}  {note}".rstrip()
        print("\r" + line.ljust(100)[:160] if self.tty else line, end="" if self.tty else "\n",
              file=self.file, flush=True)
        self.shown = True

    def close(self):
        if self.shown and self.tty:
            print(file=self.file, flush=True)


def atomic_write(path, write):
    """write(tmp), then os.replace(tmp, path): an error never leaves a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")  # np.savez wants .npz
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, exit status 2."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------------------
# The FID Inception network (pytorch-fid's FIDInceptionA-E; parameter names match its file)

def conv_bn_relu(c_in, c_out, kernel_size, stride=1, padding=0):
    """pytorch-fid's BasicConv2d: conv (no bias), BatchNorm (TF's eps 0.001), ReLU."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
        bn=nn.BatchNorm2d(c_out, eps=0.001), relu=nn.ReLU()))


POOLS = {  # TF's avg pool divides by the real pixels (count_include_pad=True: the classic bug)
    "avg": lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
    "max": lambda x: F.max_pool2d(x, 3, stride=1, padding=1),  # Mixed_7c (likely a TF bug, kept)
    "max/2": lambda x: F.max_pool2d(x, 3, stride=2),           # the grid reductions
}
SPLIT = [(384, (1, 3)), (384, (3, 1))]  # the last step of E's two 3x3 branches forks in two
BLOCKS = {  # pytorch-fid's FIDInceptionA-E as branch tables for Mixed; `c` differs between blocks
    "A": lambda c: dict(branch1x1=[(64, 1)], branch5x5=[(48, 1), (64, 5)],  # 35x35
                        branch3x3dbl=[(64, 1), (96, 3), (96, 3)], branch_pool=["avg", (c, 1)]),
    "B": lambda c: dict(branch3x3=[(384, 3, 2)], branch3x3dbl=[(64, 1), (96, 3), (96, 3, 2)],
                        pool=["max/2"]),  # 35x35 -> 17x17
    "C": lambda c: dict(branch1x1=[(192, 1)], branch7x7=[(c, 1), (c, (1, 7)), (192, (7, 1))],
                        branch7x7dbl=[(c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))],
                        branch_pool=["avg", (192, 1)]),  # 17x17: 7x7 factorized into 1x7, 7x1
    "D": lambda c: dict(branch3x3=[(192, 1), (320, 3, 2)],  # 17x17 -> 8x8
                        branch7x7x3=[(192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2)],
                        pool=["max/2"]),
    "E": lambda c: dict(branch1x1=[(320, 1)], branch3x3=[(384, 1), SPLIT],  # 8x8, c: the pool
                        branch3x3dbl=[(448, 1), (384, 3), SPLIT], branch_pool=[c, (192, 1)]),
}
MIXED = [("5b", "A", 192, 32), ("5c", "A", 256, 64), ("5d", "A", 288, 64), ("6a", "B", 288, None),
         ("6b", "C", 768, 128), ("6c", "C", 768, 160), ("6d", "C", 768, 160), ("6e", "C", 768, 192),
         ("7a", "D", 768, None), ("7b", "E", 1280, "avg"), ("7c", "E", 2048, "max")]  # c_in, c


class Mixed(nn.Module):
    """Inception block: branches concatenated on channels. A branch: an optional pool, then convs
    (c_out, kernel[, stride]) in a chain, size kept at stride 1; a pair [conv, conv] forks and
    concatenates. Names are pytorch-fid's: the branch's for one conv, else branch_1, branch_2a."""
    def __init__(self, c_in, **branches):
        super().__init__()
        self.branches = []  # (pool or None, [names of each step's convs])
        for branch, steps in branches.items():
            pool, steps = (steps[0], steps[1:]) if isinstance(steps[0], str) else (None, steps)
            chain, c = [], c_in
            for i, step in enumerate(steps, 1):
                pair = step if isinstance(step, list) else [step]
                prefix = branch if len(steps) == 1 else f"{branch}_{i}"
                chain.append([prefix + ab for ab in ("ab" if len(pair) > 1 else [""])])
                for name, (c_out, kernel, *stride) in zip(chain[-1], pair):  # stride: () or (2,)
                    padding = 0 if stride else "same"  # odd kernels: k // 2 on both sides
                    self.add_module(name, conv_bn_relu(c, c_out, kernel, *stride, padding=padding))
                c = c_out
            self.branches.append((pool, chain))

    def forward(self, x):
        outputs = []
        for pool, chain in self.branches:
            y = POOLS[pool](x) if pool else x
            for names in chain:
                y = torch.cat([getattr(self, name)(y) for name in names], dim=1)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


class FIDInceptionV3(nn.Module):
    """Input: (N, 3, 299, 299) float32 from `preprocess`. Output: pool3 features (N, D=2048) and
    logits (N, K=1008) WITHOUT the fc bias (what Inception Score uses), or None without `fc`."""
    def __init__(self, with_fc=True):
        super().__init__()
        self.Conv2d_1a_3x3 = conv_bn_relu(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv_bn_relu(32, 32, 3)
        self.Conv2d_2b_3x3 = conv_bn_relu(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv_bn_relu(64, 80, 1)
        self.Conv2d_4a_3x3 = conv_bn_relu(80, 192, 3)
        for name, block, c_in, c in MIXED:
            self.add_module(f"Mixed_{name}", Mixed(c_in, **BLOCKS[block](c)))
        self.fc = nn.Linear(2048, 1008) if with_fc else None  # bias is loaded but never used

    def forward(self, x):
        _require(x.ndim == 4 and tuple(x.shape[1:]) == (3, 299, 299),
                 f"expected a preprocessed (N, 3, 299, 299) batch, got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                      # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                      # (N, 192, 35, 35)
        for name, *_ in MIXED:  # 5b-d (N, 288, 35, 35), 6a-e (N, 768, 17, 17), 7a-c (N, 2048, 8, 8)
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))                                         # (N, D) pool3
        logits = None if self.fc is None else features @ self.fc.weight.T     # (N, K), no bias
        return features, logits


def download(url, dest, checksum, algorithm="sha256"):
    """url -> dest with progress, its `algorithm` digest checked: never a wrong or partial dest."""
    def fetch(tmp):
        digest = hashlib.new(algorithm)
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) >> 20 or None
            bar = Progress(f"downloading {dest}", size, "MiB", file=sys.stderr)
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
                bar.update(f.tell() >> 20, force=f.tell() <= 1 << 20)  # the first line at once
        bar.close()
        _require((got := digest.hexdigest()) == checksum,
                 f"{url}: {algorithm.upper()} {got}, expected {checksum} (corrupt transfer)")
    return atomic_write(dest, fetch)


def _check_device(device):
    """torch.device(device) if it is cpu, cuda[:N] or mps and present here, else a ValueError."""
    dev = torch.device("meta")  # refused below when `device` names no device
    with contextlib.suppress(RuntimeError, TypeError):
        dev = torch.device(device)
    _require(dev.type in ("cpu", "cuda", "mps"), f"device {str(device)!r}: expected cpu, cuda, "
             f"cuda:N or mps")
    n_cuda = torch.cuda.device_count()
    _require(dev.type != "cuda" or (dev.index or 0) < n_cuda,
             f"device {str(device)!r}: this machine has {n_cuda} CUDA device(s)")
    _require(dev.type != "mps" or torch.backends.mps.is_available(),
             "device 'mps': MPS is not available on this machine")
    return dev


def load_inception(weights=None, device="cpu"):
    """FIDInceptionV3 (eval, float32) on `device` from pytorch-fid's .pth (or -nofc, -nofc-fp16):
    `weights`, else $SRA2_INCEPTION_WEIGHTS, else the cache, else one download into the cache."""
    device, cached = _check_device(device), Path.home() / ".cache/sra2" / FID_WEIGHTS_FILE
    path = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if path is None and not cached.is_file():
        try:
            download(FID_WEIGHTS_URL, cached, FID_WEIGHTS_SHA256)
        except Exception as error:
            raise FileNotFoundError(f"no FID Inception weights ({error}): pass a local copy of "
                                    f"{cached.name} with --weights (fid.py) or --inception "
                                    f"(tiny_demo.py), set {WEIGHTS_ENV}=/path/to/file, or put "
                                    f"it at {cached}") from error
    path = Path(cached if path is None else path)
    _require(path.is_file(), f"FID Inception weights not found: {path}", FileNotFoundError)
    with open(path, "rb") as file:                           # a zip (torch.save), or a pickle
        _require(file.read(2) in (b"PK", b"\x80\x02"), f"{path}: not the FID Inception weights "
                 "(not a file torch.save wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # unused head
        model = FIDInceptionV3(with_fc="fc.weight" in state)
        model.load_state_dict(state)  # strict; an fp16 file is cast up by the float32 parameters
    except Exception as error:  # not a torch file, truncated, not a state dict, other weights
        detail = " ".join(str(error).split())  # load_state_dict's message spans lines
        if detail.startswith("Weights only load failed"):  # torch's advice to load it unsafely
            detail = "it holds more than tensors; refused, as loading it could run code"
        detail = detail if len(detail) <= 160 else detail[:160] + " ..."
        raise ValueError(f"{path}: not the FID Inception weights "
                         f"({type(error).__name__}: {detail})") from error
    # channels_last: oneDNN's native layout, 1.5x faster on CPU; same features to 1e-6.
    model = model.to(device=device, dtype=torch.float32, memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Preprocessing (uint8 images -> (N, 3, 299, 299) float32), statistics, image folders, .npz files

def _as_nchw_uint8(images):
    """uint8 (N, H, W, 3) or (N, 3, H, W), numpy or torch -> (N, 3, H, W); (N, 3, H, 3) is NCHW."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements="CW"))  # read-only: a copy
    _require(images.dtype == torch.uint8, f"images must be uint8 in [0, 255], got {images.dtype}")
    _require(images.ndim == 4 and 3 in (images.shape[1], images.shape[3]), f"images must be RGB "
             f"with 3 channels, (N, H, W, 3) or (N, 3, H, W); got shape {tuple(images.shape)}")
    _require(images.shape[0] > 0, "images is empty (N = 0)")
    return images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)


def _tf1_resize_matrix(size_in, size_out, device):
    """(size_out, size_in) TF1 bilinear resize: src = dst * in/out, floor(src) and +1, clamped."""
    src = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = src.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    rows, frac = torch.arange(size_out), src - lo
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix.index_put_((rows, lo), 1 - frac, accumulate=True)
    matrix.index_put_((rows, hi), frac, accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


def preprocess(images, convention="tf"):
    """uint8 images (N, 3, H, W) (or NHWC, numpy) -> float32 (N, 3, 299, 299) on their device."""
    _require(convention in CONVENTIONS, f"convention {convention!r} is not one of {CONVENTIONS}")
    x = _as_nchw_uint8(images).float()
    if convention == "pytorch-fid":
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    resize_h = _tf1_resize_matrix(x.shape[2], 299, x.device)  # (299, H)
    resize_w = _tf1_resize_matrix(x.shape[3], 299, x.device)  # (299, W)
    return (resize_h @ x @ resize_w.T - 128) / 128            # (N, 3, 299, 299)


class FeatureStats:
    """Streaming float64 mean and covariance in D + D^2 sums of f - shift (the first batch's mean:
    no digits cancel), kept on the features' device (the D x D update is fast on a GPU)."""
    def __init__(self):
        self.n, self.shift, self.sum, self.sum_outer, self.rows = 0, None, 0, 0, []

    def update(self, features):
        f = torch.as_tensor(features)
        f = (f.cpu() if f.device.type == "mps" else f).to(torch.float64)  # MPS has no float64
        _require(bool(torch.isfinite(f).all()), "features contain NaN or Inf")
        self.shift = f.mean(dim=0) if self.shift is None else self.shift
        _require(f.shape[1] == self.shift.shape[0],
                 f"features have D = {f.shape[1]}, earlier ones D = {self.shift.shape[0]}")
        centred = f.to(self.shift.device) - self.shift  # (N, D)
        self.n, self.sum = self.n + f.shape[0], self.sum + centred.sum(dim=0)  # (D,)
        self.sum_outer = self.sum_outer + centred.T @ centred                  # (D, D)
        keep = self.rows is not None and self.n <= f.shape[1]                  # while N <= D
        self.rows = self.rows + [centred] if keep else None

    def mean_cov(self):
        """(mu (D,), sigma (D, D)) as float64 numpy; sigma is unbiased (divides by N - 1)."""
        _require(self.n >= 2, f"a covariance needs at least 2 images, got {self.n}")
        mean_centred = self.sum / self.n  # mean of f - shift
        sigma = (self.sum_outer - self.n * torch.outer(mean_centred, mean_centred)) / (self.n - 1)
        return (self.shift + mean_centred).cpu().numpy(), sigma.cpu().numpy()

    def factor(self):
        """C (D, N) with sigma = C C^T, C = (f - mu)^T / sqrt(N - 1) from the features themselves
        (exact, no D x D eigendecomposition), or None once N > D (psd_factor(sigma) then)."""
        if not self.rows:
            return None
        centred = torch.cat(self.rows)                                          # (N, D)
        return ((centred - centred.mean(dim=0)).T / (self.n - 1) ** 0.5).cpu().numpy()


@contextlib.contextmanager
def _full_float32():
    """TF32 (and oneDNN's bf16/tf32 on CPU) off inside: FID must not depend on the chip."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "conv"):  # never mix the APIs
        flags = [(layer, "fp32_precision", "ieee") for layer in (b.cuda.matmul, b.cudnn.conv, *(
            getattr(b.mkldnn, op) for op in ("matmul", "conv") if hasattr(b.mkldnn, op)))]
    else:
        flags = [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]
    with contextlib.ExitStack() as restore:  # on exit: the precision, then each flag
        for obj, name, _ in flags:
            restore.callback(setattr, obj, name, getattr(obj, name))
        restore.callback(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
        torch.set_float32_matmul_precision("highest")
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield


def compute_statistics(images, model=None, batch_size=200, device=None, convention="tf",
                       weights=None, progress=False, return_is_logits=False, total=None,
                       return_factor=False):
    """Pool3 (mu (D,), sigma (D, D)) float64 of N >= 2 uint8 RGB images, (N, H, W, 3) or (N, 3, H,
    W), numpy or torch, or an iterable of such batches (to stream generated images). model: from
    load_inception, else loaded from `weights`; progress: a line on stderr once it takes over 1 s
    (`total`: N of an iterable; a string: the line's label); return_is_logits: also the (N, K)
    logits for inception_score; return_factor: also FeatureStats.factor() for frechet_distance."""
    _require(isinstance(batch_size, (int, np.integer)) and batch_size >= 1,
             f"batch_size must be an integer >= 1, got {batch_size!r}")
    if whole := isinstance(images, (np.ndarray, torch.Tensor)):
        total = _as_nchw_uint8(images).shape[0]  # checks dtype, layout, emptiness before any work
        _require(total >= 2, f"a covariance needs at least 2 images, got {total}")
    model = load_inception(weights, device or "cpu") if model is None else model
    device = _check_device(device) if device else next(model.parameters()).device
    _require(not return_is_logits or getattr(model, "fc", None) is not None, f"Inception Score "
             f"needs the 1008-way fc layer of {FID_WEIGHTS_FILE}; -nofc files give features only")
    stats, all_logits = FeatureStats(), []
    label = progress if isinstance(progress, str) else "Inception features"
    bar = Progress(label, total, "img", file=sys.stderr) if progress else None
    # autocast off: a caller's bf16 context must not leak into the features.
    with torch.no_grad(), _full_float32(), torch.autocast(torch.device(device).type, enabled=False):
        for batch in [images] if whole else images:
            for part in _as_nchw_uint8(batch).split(batch_size):
                features, logits = model(preprocess(part.to(device), convention))
                stats.update(features)
                if return_is_logits:
                    all_logits.append(logits.float().cpu().numpy())
                # quiet unless slow; the last line, with the time in all, comes after the loop
                if bar and stats.n != total and time.perf_counter() - bar.start > 1:
                    bar.update(stats.n)
    if bar and bar.shown:
        bar.update(stats.n, f"{fmt_time(time.perf_counter() - bar.start)} in all", force=True)
        bar.close()
    _require(stats.n > 0, "no images were given")
    mu, sigma = stats.mean_cov()
    extra = [np.concatenate(all_logits)] if return_is_logits else []
    return (mu, sigma, *extra, *[stats.factor()] * return_factor)


def _folder_batches(path, batch_size):
    """(N, batches) of folder `path`'s sorted images: headers checked now (one size), read later."""
    from PIL import Image  # pillow only needed for folders
    def read(file, decode=True):  # decode=False: (W, H) from the header
        try:
            with Image.open(file) as image:
                return np.asarray(image.convert("RGB")) if decode else image.size
        except Exception as error:  # not an image, truncated, unreadable
            raise ValueError(f"{file}: not a readable image "
                             f"({type(error).__name__}: {error})") from error
    path = Path(path)
    _require(path.exists(), f"{path}: no such file or directory", FileNotFoundError)
    _require(path.is_dir(), f"{path}: not a folder", NotADirectoryError)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    _require(files, f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {path}")
    w, h = read(files[0], decode=False)
    for file in files[1:]:  # the first bad file is the one named
        size = read(file, decode=False)
        _require(size == (w, h), f"{file} is {size[0]}x{size[1]} but {files[0]} is {w}x{h}: a "
                 f"folder's images must have one size (resize them first)")
    return len(files), (np.stack([read(file) for file in files[i:i + batch_size]])
                        for i in range(0, len(files), batch_size))


def statistics_from_folder(path, batch_size=200, **kwargs):
    """compute_statistics of the images in folder `path`, all of one size (resizing changes FID)."""
    n, batches = _folder_batches(path, batch_size)
    return compute_statistics(batches, batch_size=batch_size, total=n, **kwargs)


def _check_stats(mu, sigma, name="statistics"):
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    _require(mu.ndim == 1 and sigma.shape == (mu.shape[0], mu.shape[0]),
             f"{name}: need mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    _require(np.isfinite(mu).all() and np.isfinite(sigma).all(), f"{name} has NaN or Inf")
    return mu, sigma


def save_statistics(path, mu, sigma, convention=None):
    """.npz (appended if missing) with mu, sigma and the convention; never a half-written file."""
    mu, sigma = _check_stats(mu, sigma)
    extra = {} if convention is None else {"convention": np.array(convention)}
    path = Path(path if str(path).endswith(".npz") else f"{path}.npz")
    _require(path.parent.is_dir(), f"{path.parent}: no such folder to save {path.name} in",
             FileNotFoundError)
    atomic_write(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma, **extra))  # tmp ends in .npz


def load_statistics(path, return_convention=False):
    """(mu, sigma) float64 from an .npz with keys mu and sigma (ours, pytorch-fid's, ADM's);
    return_convention: also the convention saved with them (None where none was)."""
    try:
        with open(path, "rb") as file:
            _require(file.read(2) == b"PK", "not a zip archive")  # else np.load tries a pickle
        with np.load(path) as data:  # allow_pickle=False: never runs code from the file
            keys = data.files
            arrays = {key: data[key] for key in ("mu", "sigma", "convention") if key in keys}
    except FileNotFoundError:
        raise
    except Exception as error:  # not a zip, truncated, a corrupt member, a pickled array
        raise ValueError(f"{path}: not a readable .npz file "
                         f"({type(error).__name__}: {error})") from error
    _require({"mu", "sigma"} <= arrays.keys(), f"{path} needs keys 'mu' and 'sigma', has {keys}")
    mu, sigma = _check_stats(arrays["mu"], arrays["sigma"], name=str(path))
    convention = str(arrays["convention"]) if "convention" in arrays else None
    return (mu, sigma, convention) if return_convention else (mu, sigma)


# ----------------------------------------------------------------------------------------------
# Distances and scores

def psd_factor(sigma, name="sigma"):
    """C (D, R) with sigma = C C^T, from eigh: C = V W^(1/2) over the R eigenvalues that are not
    rounding noise (sqrt would turn each 1e-16 into 1e-8). Checks symmetric and PSD."""
    _require(np.abs(sigma - sigma.T).max() <= 1e-6 * max(1.0, np.abs(sigma).max()),
             f"{name} is not symmetric, so it is no covariance")
    w, v = np.linalg.eigh(sigma)
    _require(w.min() >= -1e-6 * max(1.0, w.max()),  # sqrtm would see an imaginary part > 1e-3
             f"{name} is not positive semi-definite (eigenvalue {w.min():.3g})")
    keep = w > len(w) * np.finfo(np.float64).eps * np.abs(w).max()
    return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None, factor2=None):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64. With S = C C^T, S1 S2 has
    the non-zero eigenvalues of (C2^T C1)^T (C2^T C1): tr((S1 S2)^(1/2)) is the sum of the singular
    values of C2^T C1, exact also for singular S (N < D), ~2x faster than scipy's sqrtm (tested).
    factor1, factor2: C with S = C C^T where known (compute_statistics(return_factor=True): for
    N <= D images, (D, N) from the features), so no D x D eigendecomposition is needed: then
    C2^T C1 is (N2, N1) and a FID of few images takes milliseconds, not seconds."""
    mu1, sigma1 = _check_stats(mu1, sigma1, "stats 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "stats 2")
    _require(mu1.shape == mu2.shape,
             f"statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    factor1 = psd_factor(sigma1, "sigma1") if factor1 is None else factor1  # C1 (D, R1)
    factor2 = psd_factor(sigma2, "sigma2") if factor2 is None else factor2  # C2 (D, R2)
    cross = factor2.T @ factor1                                              # C2^T C1, (R2, R1)
    tr_covmean = np.linalg.svd(cross, compute_uv=False).sum()                # tr((S1 S2)^(1/2))
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """(mean, std) of exp(mean_x KL(p(y|x) || p(y))) over `splits` parts of the (N, K) logits."""
    logits = torch.as_tensor(logits).detach().to(device="cpu", dtype=torch.float64)
    _require(logits.ndim == 2 and logits.shape[0] >= splits >= 1,
             f"need (N, K) logits with N >= splits = {splits}, got {tuple(logits.shape)}")
    _require(bool(torch.isfinite(logits).all()), "logits contain NaN or Inf")
    log_p, n, scores = torch.log_softmax(logits, dim=1), logits.shape[0], []  # log p(y|x), (N, K)
    for part in (log_p[i * n // splits:(i + 1) * n // splits] for i in range(splits)):
        log_p_y = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # log p(y), (K,)
        kl = (part.exp() * (part - log_p_y)).sum(dim=1)                  # (N / splits,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# CLI, like pytorch-fid's

def _run(args):
    """The CLI; every input problem (paths, .npz files, image headers) shows before the network."""
    args.device = str(_check_device(args.device or sra2.pick_device()))
    inputs, out = (args.path[:1], args.path[1]) if args.save_stats else (args.path, None)
    for path in inputs:
        _require(os.path.exists(path), f"{path}: no such file or directory", FileNotFoundError)
        _require(os.path.isdir(path) or path.endswith(".npz"),
                 f"{path}: neither an image folder nor an .npz file")
    if out:
        _require(not os.path.exists(out) or os.path.isdir(out), f"--save-stats: {out} exists; "
                 "give another file name, or move it away (nothing was changed)", FileExistsError)
        _require(os.path.isdir(inputs[0]), f"--save-stats computes the statistics of an image "
                 f"folder; {inputs[0]} is a file")
        _require(out.endswith(".npz") and not os.path.isdir(out),
                 f"--save-stats writes an .npz file; {out} is not an .npz file name")
        _require(Path(out).parent.is_dir(), f"{Path(out).parent}: no such folder to save "
                 f"{Path(out).name} in", FileNotFoundError)
    stats = {p: load_statistics(p, return_convention=True) for p in inputs if not os.path.isdir(p)}
    folders = {path: _folder_batches(path, args.batch_size) for path in inputs if path not in stats}
    for path, (n, _) in folders.items():
        _require(n >= 2, f"{path}: {n} image; FID needs a covariance, so at least 2")
    conventions = {c for c in [*(s[2] for s in stats.values()), *[args.convention] * bool(folders)]
                   if c}
    _require(len(conventions) <= 1 or out, f"the statistics use different conventions "
             f"({' vs '.join(sorted(conventions))}): FID is meaningless (--convention sets a "
             "folder's)")
    model, factors = load_inception(args.weights, args.device) if folders else None, {}
    for path, (n, batches) in folders.items():  # (mu, sigma, convention) as from an .npz file
        print(f"Inception features of {path} ({n} images) ...", file=sys.stderr, flush=True)
        mu, sigma, factors[path] = compute_statistics(
            batches, model=model, batch_size=args.batch_size, device=args.device,
            convention=args.convention, progress=f"Inception features of {path}", total=n,
            return_factor=True)                 # N <= D: the FID needs no eigendecomposition
        stats[path] = (mu, sigma, args.convention)
    if out:
        save_statistics(out, *stats[inputs[0]])
        print(f"saved statistics ({args.convention} convention) to {out}")
    else:
        (mu1, sigma1, conv1), (mu2, sigma2, conv2) = (stats[path] for path in inputs)
        if len(mu1) >= 512:  # two D x D eigendecompositions and an SVD: seconds to minutes on a CPU
            print(f"Frechet distance of {len(mu1)}-d statistics ...", file=sys.stderr, flush=True)
        fid = frechet_distance(mu1, sigma1, mu2, sigma2, *(factors.get(p) for p in inputs))
        print(f"FID ({conv1 or conv2 or 'unknown'} convention): {fid:.4f}")
    for path, n in ((path, n) for path, (n, _) in folders.items() if n < 2048):  # after the result
        print(f"warning: {path} has {n} images, fewer than the 2048 features: FID reads high "
              f"and depends on N; compare FIDs at one N (the papers use 50,000)", file=sys.stderr)
    return None if out else fid


def main(argv=None):
    def positive_int(text):  # argparse's error: "argument --batch-size: must be an integer >= 1"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    parser = OneLineParser(prog="fid.py", description="FID of two image folders or .npz files. "
                           "The Inception Score is not a CLI output: in Python, fid.inception_score"
                           " of compute_statistics(..., return_is_logits=True), with weights that "
                           f"have the fc layer ({FID_WEIGHTS_FILE}, the default; -nofc files "
                           "have none)")
    add = parser.add_argument
    add("path", nargs=2, help="image folders or .npz files with mu and sigma")
    add("--save-stats", action="store_true", help="save folder PATH1's statistics to PATH2 (.npz)")
    add("--batch-size", type=positive_int, default=200)
    add("--device", default=None, help="default: cuda, then mps, then cpu")
    add("--convention", choices=CONVENTIONS, default="tf")
    add("--weights", default=None, help=f"Inception .pth (default: ${WEIGHTS_ENV} or cache)")
    try:
        return _run(parser.parse_args(argv))
    except (OSError, ValueError) as error:  # bad input: one line naming it, no traceback
        parser.error(" ".join(str(error).split()))


if __name__ == "__main__":
    main()
