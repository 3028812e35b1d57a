"""demo_infra.py: what tiny_demo.py needs around its experiment, kept out of the reader's way.
Sections: the run (device and torchrun, folder and log, the CPU time estimate, the commit and
machine); the data (CIFAR-10 downloaded once with its MD5, read without unpickling code, and
synthetic shapes for tests and --quick); checkpoints that resume exactly and are never overwritten
by a fresh start, caches, and FID against a cached reference; records (the seeds' mean), PNG
charts and image grids drawn with PIL alone (results/study.py draws with them too), text tables.
Nothing here is part of the method."""
import hashlib
import io
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel

import fid
import sra2
from fid import atomic_write, fmt_time


class DemoError(Exception):
    """A problem with the user's input: tiny_demo.main prints it as one line, exit status 2."""
    status = 2


class Interrupted(DemoError):
    """Ctrl-C, answered with a checkpoint: one line, exit status 130 (the shell's for SIGINT)."""
    status = 130


# ----------------------------------------------------------------------------------------------
# The run: device, torchrun's processes, the output folder and its log

LOG_FILE = None                                     # out/log.txt: the log holds what the user saw


def say(*lines):
    """Print (rank 0) and append to LOG_FILE."""
    if rank_and_world()[0] == 0:
        print(*lines, sep="\n", flush=True)
        if LOG_FILE is not None:
            with open(LOG_FILE, "a") as f:
                f.write("".join(line + "\n" for line in lines))


def fail(line):
    """An error line on stderr (rank 0, also before the process group), and in the log."""
    if os.environ.get("RANK", "0") == "0":                     # every rank fails alike; one says so
        print(line, file=sys.stderr, flush=True)
        if LOG_FILE is not None:
            with open(LOG_FILE, "a") as f:
                f.write(line + "\n")


STOP = []                           # set by Ctrl-C during training: stop after the step, saved
USUAL_CTRL_C = []                   # the SIGINT handler that catch_ctrl_c replaced


def catch_ctrl_c(on=True):
    """on: the first Ctrl-C asks the training loop to stop after its step and save a checkpoint
    (a second one stops at once); off: Ctrl-C as before. Not under torchrun, whose ranks would
    have to agree on the step."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        return STOP
    if USUAL_CTRL_C:
        signal.signal(signal.SIGINT, USUAL_CTRL_C.pop())
    if on and torchrun_world() == 1:
        def ask(signum, frame):
            signal.signal(signal.SIGINT, USUAL_CTRL_C[0])                  # the next one: at once
            STOP.append(True)                  # a raw write: print() here may be reentrant
            os.write(1, b"\nCtrl-C: stopping after this step with a checkpoint (again: at once, "
                     b"without)\n")
        USUAL_CTRL_C.append(signal.signal(signal.SIGINT, ask))
    return STOP


def setup(args):
    """The device, torchrun's process group, threads, the output folder and its log; the card."""
    global LOG_FILE
    try:
        device = sra2.pick_device(args.device)
    except (ValueError, RuntimeError) as error:
        raise DemoError(f"--device {args.device}: {error}") from None
    if torchrun_world() > 1 and not dist.is_initialized():
        if device.type not in ("cuda", "cpu"):
            raise DemoError(f"torchrun on {device.type}: use CUDA (NCCL) or --device cpu (gloo)")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a GPU each
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)      # OpenMP threads spin-wait: few for small ops
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")             # TF32 outside autocast
        torch.backends.cudnn.benchmark = True
    rank, world = rank_and_world()
    try:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        if rank == 0:                                          # the other ranks write nothing
            Path(args.out).mkdir(parents=True, exist_ok=True)
            LOG_FILE = Path(args.out) / "log.txt"              # a run's log starts with its command
            with open(LOG_FILE, "a") as f:
                f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: tiny_demo.py "
                        f"{' '.join(args.argv)}\n")
    except OSError as error:
        raise DemoError(f"cannot create --out/--cache folder ({error})") from None
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return device, Path(args.out), card + (f" x {world} processes (DDP)" if world > 1 else "")


def teardown():
    """The end of a run, also a failed one: the log closed, torchrun's process group left."""
    global LOG_FILE
    LOG_FILE = None
    catch_ctrl_c(False)
    if dist.is_initialized():
        dist.destroy_process_group()


def machine():
    """What ran it: the commit (with '+changes' if the tree differed) and the hardware."""
    git = lambda *a: subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *a],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        commit += "+changes" * bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(commit=commit or "unknown", platform=platform.platform(), cpu_count=os.cpu_count(),
                processor=platform.processor() or platform.machine(), cpu=cpu_name(),
                torch=torch.__version__, python=platform.python_version())


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, family and model, and whether it has native bf16 (Linux; two EPYCs
    of one name can be Zen 3 or Zen 4), else ''."""
    try:
        info = dict(line.split(":", 1) for line in Path(cpuinfo).read_text().split("\n\n")[0]
                    .splitlines() if ":" in line)
    except OSError:
        return ""
    info = {k.strip(): v.strip() for k, v in info.items()}
    bf16 = ", native bf16" * (sra2.default_precision("cpu") == "bf16")
    return f"{info.get('model name', '')} (family {info.get('cpu family')}, model {info.get('model')}{bf16})"


def estimate(args, per_image, n_runs, have_stage1, have_reference):
    """A run's time on this CPU: `per_image` seconds (SiT + P training step "sit", VAE training
    step "vae" or a TAEF2 encoding, Inception pass "inception") scaled by the settings; a
    sampler step or a held-out image costs a third of a training step. What is cached already
    costs nothing."""
    fid_images = args.evals * args.fid_n + args.final_fid_n
    forwards = args.evals * args.fid_n * args.fid_sampling_steps + args.final_fid_n * \
        args.final_sampling_steps + args.heldout_evals * args.heldout_n
    stage1 = args.vae_steps * args.vae_batch if args.vae == "own" else 2 * (args.n_images or 50000)
    parts = {"stage 1": 0 if have_stage1 else stage1 * per_image["vae"],
             "FID reference": 0 if have_reference else args.fid_ref_n * per_image["inception"],
             f"{n_runs} runs": n_runs * ((args.steps * args.batch_size + forwards / 3) *
                                        per_image["sit"] + fid_images * per_image["inception"])}
    total = sum(parts.values())
    return (("note: a long run on a CPU: " if total > 1800 else "") + f"about {fmt_time(total)} "
            "here (" + ", ".join(f"{k} {fmt_time(v)}" for k, v in parts.items() if v) +
            "; from timed steps of each part)" + ("; --preset cpu is made for two cores"
                                                  if args.preset == "full" else ""))


def torchrun_world():
    return int(os.environ.get("WORLD_SIZE", "1"))                # set by torchrun


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
    value = [fn(*args) if rank_and_world()[0] == 0 else None]
    if rank_and_world()[1] > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def gather_chunks(mine):
    """Under torchrun, every rank's (index, tensor) chunks, gathered on every rank in index order
    (CPU tensors: samples are small); else `mine` as it is."""
    world = rank_and_world()[1]
    if world == 1:
        return mine
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return sorted((part for parts in gathered for part in parts), key=lambda part: part[0])


def data_parallel(module, device):
    """Under torchrun, DDP: every rank starts from rank 0's weights and gradients are averaged.
    SiT and P get a wrapper each (training_loss calls them in turn); every parameter of both
    gets a gradient every step, so DDP's unused-parameter error cannot occur."""
    if module is None or rank_and_world()[1] == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def synced_clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------
# Data: CIFAR-10 (the official archive, downloaded once and MD5-checked, or its folder, read
# safely) and a synthetic stand-in for tests and --quick

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


def read_cifar(path, split="train"):
    """A split of CIFAR-10 from a cifar-10-batches-py folder (or its parent) or the .tar.gz."""
    path = Path(path).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    where = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    if path.is_dir():
        raws = {n: (where / n).read_bytes() for n in names if (where / n).is_file()}
    elif path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                raws = {n: tar.extractfile(members[n]).read() for n in names if n in members}
        except Exception as error:                             # tarfile, gzip, zlib, OS errors
            raise DemoError(f"{path}: corrupt or truncated archive ({type(error).__name__}: "
                            f"{error})") from None
    else:
        raise DemoError(f"--data {path}: no such file or folder")
    if missing := [n for n in names if n not in raws]:
        kind = "a CIFAR-10 python folder" if path.is_dir() else "the CIFAR-10 python archive"
        raise DemoError(f"--data {path}: not {kind} ({', '.join(missing)} missing)")
    images, labels = zip(*(parse_cifar_batch(f"{where}/{n}", raws[n]) for n in names))
    return np.concatenate(images), np.concatenate(labels)


def parse_cifar_batch(name, raw):
    """One pickled batch -> (images uint8 (n, 32, 32, 3), labels int64 (n,))."""
    try:
        batch = ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
        ok = data.dtype == np.uint8 and data.shape[1:] == (3072,) and len(labels) == len(data)
        problem = None if ok and ((labels >= 0) & (labels <= 9)).all() else (
            f"data {data.dtype} {data.shape}, {len(labels)} labels; expected uint8 (n, 3072) "
            "and n labels in 0..9")
    except Exception as error:                                 # a bad pickle can raise anything
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise DemoError(f"{name}: corrupt CIFAR-10 batch file ({problem})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels    # R,G,B planes -> NHWC


class ArrayUnpickler(pickle.Unpickler):
    """Numpy arrays and plain values only: a doctored data file cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in
        (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def download_cifar(cache):
    """The official archive in `cache`, downloaded once; only a file with the right MD5 is kept."""
    archive = Path(cache) / "cifar-10-python.tar.gz"
    if archive.is_file() and hashlib.md5(archive.read_bytes()).hexdigest() != CIFAR_MD5:
        raise DemoError(f"{archive}: MD5 mismatch (corrupt file); delete it to download again")
    if not archive.is_file():
        say(f"downloading CIFAR-10 (163 MiB) to {archive}")
        try:
            fid.download(CIFAR_URL, archive, CIFAR_MD5, "md5")
        except ValueError as error:                            # the MD5: nothing was kept
            raise DemoError(f"{error}; run again") from None
        except OSError as error:
            raise DemoError(f"could not download CIFAR-10 ({error}); pass --data PATH to a local "
                            "copy (a cifar-10-batches-py folder or the .tar.gz)") from None
    return archive


def synthetic_images(n, seed=0):
    """Class-conditional stand-in for CIFAR-10 (tests, --quick): class k is a shape (k % 5: disc,
    square, ring, bar, cross) in a hue of its own, at a random place and size, on a random dark
    gradient. Learnable in seconds; NOT a benchmark."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    labels, images = rng.integers(0, 10, n), np.empty((n, 32, 32, 3), np.uint8)
    for i, k in enumerate(labels):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        dy, dx = yy - cy, xx - cx
        mask = [dy**2 + dx**2 < r**2, np.maximum(abs(dy), abs(dx)) < r * 0.8,
                abs(np.sqrt(dy**2 + dx**2) - r * 0.8) < 2, abs(dy) < r * 0.35,
                (abs(dy) < 2) | (abs(dx) < 2)][k % 5] & (abs(dy) < r) & (abs(dx) < r)
        color = 140 + 110 * np.cos((k / 10 + np.array([0, 1 / 3, 2 / 3])) * 2 * np.pi
                                   + rng.normal(0, 0.15))
        background = rng.uniform(0, 90, 3) * (0.5 + 0.5 * (yy / 31)[..., None])
        images[i] = np.where(mask[..., None], color, background).clip(0, 255)
    return images, labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# TAEF2, the pretrained stage 1 of --vae taef2: a tiny autoencoder distilled from the FLUX.2 VAE
# (the taesd project, MIT license), written here with the released parameter names. Images in
# [0, 1], 32 latent channels at 1/8 of the size, a deterministic encoder, no scale factor.

TAEF2_URL = "https://github.com/madebyollin/taesd/raw/main/taef2_{}.pth"
TAEF2_SHA256 = {"encoder": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
                "decoder": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"}
TAEF2_ENV = "SRA2_TAEF2"              # a folder holding taef2_encoder.pth and taef2_decoder.pth


def conv3(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class TAEBlock(nn.Module):
    """relu(body(x) + x), body = conv, relu, conv, relu, conv at 64 channels; with `pool`, first
    x = x + pool(x), a per-pixel MLP (64 -> 256 -> 64, GroupNorm) of FLUX.2's variant."""

    def __init__(self, pool=False):
        super().__init__()
        self.conv = nn.Sequential(conv3(64, 64), nn.ReLU(), conv3(64, 64), nn.ReLU(), conv3(64, 64))
        self.pool = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.GroupNorm(4, 256),
                                  nn.ReLU(), nn.Conv2d(256, 64, 1, bias=False)) if pool else None

    def forward(self, x):
        x = x + self.pool(x) if self.pool is not None else x
        return torch.relu(self.conv(x) + x)


class Clamp(nn.Module):
    def forward(self, z):
        return 3 * torch.tanh(z / 3)                           # latents softly into (-3, 3)


class TAEF2(nn.Module):
    """encoder: (N, 3, H, W) in [0, 1] -> (N, 32, H/8, W/8); decoder: back, roughly [0, 1]. As a
    stage 1, encode and decode speak the demo's VAE interface: 32-px images in [-1, 1], taken to
    64 px (bicubic) for the encoder (8x8x32 latents: at 32 px the 4x4 latents lose much detail),
    and the decoder's 64 px taken back to 32 (area: the mean of each 2x2 block)."""

    def __init__(self):
        super().__init__()
        down = lambda: nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)   # H -> H/2
        up = lambda: [nn.Upsample(scale_factor=2), conv3(64, 64, bias=False)]   # nearest, H -> 2H
        blocks = lambda n, pool=False: [TAEBlock(pool) for _ in range(n)]
        self.encoder = nn.Sequential(                                          # (N, 3, H, W) ->
            conv3(3, 64), *blocks(1), down(), *blocks(3), down(), *blocks(3),  # (N, 64, H/4, W/4)
            down(), *blocks(3, pool=True), conv3(64, 32))                      # (N, 32, H/8, W/8)
        self.decoder = nn.Sequential(                                          # (N, 32, h, w) ->
            Clamp(), conv3(32, 64), nn.ReLU(), *blocks(3, pool=True), *up(),   # (N, 64, 2h, 2w)
            *blocks(3), *up(), *blocks(3), *up(), *blocks(1), conv3(64, 3))    # (N, 3, 8h, 8w)

    def encode(self, x):
        """x (N, 3, 32, 32) in [-1, 1] -> (latents (N, 32, 8, 8), None: no posterior spread)."""
        x = F.interpolate((x + 1) / 2, scale_factor=2, mode="bicubic").clamp(0, 1)   # 64 px
        return self.encoder(x), None

    def decode(self, z):
        """z (N, 32, 8, 8) -> (N, 3, 32, 32) in [-1, 1]."""
        return F.avg_pool2d(self.decoder(z).clamp(0, 1), 2) * 2 - 1


def load_taef2(folder, cache):
    """TAEF2 from taef2_{encoder,decoder}.pth in `folder` (the user's), else in `cache`, where
    they are downloaded once; a file whose SHA-256 is not the release's is refused."""
    model = TAEF2()
    for part, net in (("encoder", model.encoder), ("decoder", model.decoder)):
        path = Path(folder or cache).expanduser() / f"taef2_{part}.pth"
        if folder is None and not path.is_file():
            try:
                fid.download(TAEF2_URL.format(part), path, TAEF2_SHA256[part])
            except (OSError, ValueError) as error:             # nothing partial is kept
                raise DemoError(f"could not download TAEF2's {part} ({error}); pass --taef2 DIR "
                                f"(or set {TAEF2_ENV}): a folder with taef2_{part}.pth") from None
        if not path.is_file():
            raise DemoError(f"--taef2 {folder}: no taef2_{part}.pth there")
        if (got := hashlib.sha256(path.read_bytes()).hexdigest()) != TAEF2_SHA256[part]:
            raise DemoError(f"{path}: SHA-256 {got[:16]}..., not the released TAEF2 {part}'s "
                            f"{TAEF2_SHA256[part][:16]}... (a wrong or truncated file); replace "
                            "or delete it")
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))   # strict
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Checkpoints, caches, and FID against the cached reference

CKPT_FORMAT = "tiny_demo/2"                # /1: before the held-out loss and the study knobs
# Settings a resumed run may change: where files are, how fast it runs, how often it saves. Any
# other difference would make it a different run.
RESUME_FREE = {"out", "cache", "data", "inception", "device", "threads", "compile", "resume",
               "ckpt_minutes", "ckpt_every", "runs", "preset", "argv", "seed", "seeds", "quick",
               "ablate", "taef2"}
# Settings that older checkpoints lack, at the value those runs had.
SETTINGS_BEFORE = {"vae": "own"}


def ckpt_path(args, out, run):
    """out/ckpt/<run>.pt; with several seeds, <run>-seed<k>.pt."""
    return Path(out) / "ckpt" / (f"{run.name}-seed{args.seed}.pt" if len(args.seeds) > 1
                                 else f"{run.name}.pt")


def save_checkpoint(path, model, ema, projector, opt, step, args, run, rec):
    """All a resume needs, as plain tensors and values (torch.load(weights_only=True)). The
    random state is `step` itself: every draw is a function of (seed, step)."""
    state = dict(format=CKPT_FORMAT, step=step, settings=vars(args), run=vars(run), record=rec,
                 model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                 projector=projector.state_dict() if projector is not None else {})
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
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise DemoError(f"--resume: {path} is not a {CKPT_FORMAT} checkpoint; {fix}")
    # SRA 2's settings are the run's (an ablation row changes them): compared there, and only for
    # an SRA 2 run; a baseline does not use them.
    sra_keys = set(vars(run)) - {"name", "label", "align", "settings"}
    then = {**SETTINGS_BEFORE, **{k: v for k, v in ckpt["settings"].items() if k not in sra_keys},
            "seed": ckpt["record"]["seed"], "run": ckpt["run"]["name"]}
    now = {**{k: v for k, v in vars(args).items() if k not in sra_keys}, "run": run.name}
    if run.align and ckpt["run"].get("align"):
        then.update({k: ckpt["run"].get(k) for k in sra_keys})
        now.update({k: getattr(run, k) for k in sra_keys})
    show = lambda value: json.dumps(value, sort_keys=True, default=str)
    brief = lambda value: show(value) if len(show(value)) <= 24 else show(value)[:20] + " ..."
    changed = [k for k in sorted(set(then) | set(now)) if (k not in RESUME_FREE or k == "seed")
               and show(then.get(k)) != show(now.get(k))]
    if changed:
        name = lambda k: "the run" if k == "run" else "--" + k.replace("_", "-")
        diffs = "; ".join("the training data" if k == "data_id" else
                          f"{name(k)}: {brief(then.get(k))} there, {brief(now.get(k))} now"
                          for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise DemoError(f"--resume: {path} is from another run ({diffs}{more}); {fix}, or resume "
                        "with its settings")
    return ckpt


def resume(path, args, run, rec, **modules):
    """With --resume and a checkpoint at `path` (checked before any work: check_checkpoints): its
    state loaded into `modules` (None: skipped), and (its step, its record); else (0, rec)."""
    if not (args.resume and path.is_file()):
        return 0, rec
    ckpt = load_checkpoint(path, args, run)
    for key, module in modules.items():
        module is None or module.load_state_dict(ckpt[key])
    rec = {**rec, **ckpt["record"]}
    say(f"{run.label}: " + ("finished; its record is reused" if "final_fid" in rec else
                            f"resumed at step {ckpt['step']}") + f" ({path})")
    return ckpt["step"], rec


def check_checkpoints(args, runs, out):
    """Before any work. --resume: there must be a checkpoint, and every one there must be readable
    and this run's. Without it: nothing in --out is written over, neither an unfinished run's
    checkpoint (--resume continues it) nor a finished run's results."""
    found = False
    for args.seed in args.seeds:
        for path, run in ((ckpt_path(args, out, run), run) for _, _, run in runs):
            if path.is_file() and args.resume:
                found = load_checkpoint(path, args, run, mmap=True) is not None
            elif path.is_file():
                try:
                    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    finished = "final_fid" in ckpt["record"]
                except Exception:                              # unreadable or foreign: named below
                    continue
                if not finished:
                    raise DemoError(f"{path} holds an unfinished run (step {ckpt['step']} of "
                                    f"{ckpt['settings'].get('steps')}): pass --resume to continue "
                                    "it, or move it away to start over")
    args.seed = args.seeds[0]
    if args.resume and not found:
        raise DemoError(f"--resume: no checkpoint of this run in {Path(out) / 'ckpt'}; nothing "
                        "to resume (without --resume it starts from scratch)")
    done = [p for p in [Path(out) / "results.json", *sorted(Path(out).glob("ckpt/*.pt"))]
            if p.is_file()]
    if done and not args.resume:
        raise DemoError(f"--out {out} holds a run's results ({done[0]}): give another --out, or "
                        "move it away; nothing was changed (the same settings with --resume "
                        "reuse a finished run)")


class FIDMeter:
    """FID of uint8 images against the (cached) Inception statistics of the training images;
    fid.frechet_distance is exact also for the singular covariance of fewer than 2048 images, and
    with the factors C (S = C C^T) of both sides it needs no 2048 x 2048 eigendecomposition."""

    def __init__(self, args, images, data_id, device):
        self.device, n_ref = device, min(args.fid_ref_n, len(images))
        self.model, path = load_inception(args, device), reference_path(args, data_id, n_ref)
        stats = read_cache(path, lambda: load_reference(path))
        if stats is None:
            say(f"FID reference: Inception statistics of {n_ref} training images (then cached)")
            stats = self.statistics(images[:n_ref])
            factor = {} if stats[2] is None else dict(factor=stats[2])
            atomic_write(path, lambda tmp: np.savez(tmp, mu=stats[0], sigma=stats[1],
                                                    convention=np.array("tf"), **factor))
        self.mu, self.sigma, self.factor = stats
        if self.factor is None:                               # over 2048 images: once, not per FID
            self.factor = fid.psd_factor(self.sigma)

    def statistics(self, images):          # small batches on a CPU: the progress line moves
        return fid.compute_statistics(images, self.model, 200 if self.device.type == "cuda" else 50,
                                      self.device, progress=True, return_factor=True)

    def __call__(self, images):
        mu, sigma, factor = self.statistics(images)
        return fid.frechet_distance(self.mu, self.sigma, mu, sigma, self.factor, factor)


def load_reference(path):
    """(mu, sigma, factor or None) of a FIDMeter cache file."""
    with np.load(path) as data:
        return data["mu"], data["sigma"], data["factor"] if "factor" in data.files else None


def load_inception(args, device):
    """fid.load_inception of --inception; a file that is not the weights is the user's error."""
    try:                                                   # fid.py names a file that is no weights
        return fid.load_inception(args.inception, device)
    except ValueError as error:
        raise DemoError(f"--inception {error}") from None


def reference_path(args, data_id, n_ref):
    """The FID reference statistics' cache file: keyed by the data, its size and the weights."""
    weights = Path(args.inception) if args.inception else None
    key = digest(data_id, n_ref, "tf", weights.name if weights else "default",
                 weights.stat().st_size if weights else 0)
    return Path(args.cache) / f"fid-ref-{key}.npz"


def read_cache(path, load):
    """load() of a cache file, or None if there is none or it is unreadable (then it is built
    again: a cache holds nothing that cannot be made again)."""
    try:
        return load() if Path(path).is_file() else None
    except Exception as error:
        say(f"note: cache file {path} is unreadable ({type(error).__name__}); building it again")


def digest(*parts):
    """Short hash of JSON-able settings and byte strings: the cache key."""
    h = hashlib.sha1()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Records, pictures and tables


def mean_record(recs):
    """The seeds' average run: every number of its curves, checkpoint by checkpoint."""
    mean = lambda values: None if None in values else sum(values) / len(values)
    average = lambda curves: [{k: es[0][k] if k == "step" else mean([e[k] for e in es])
                               for k in es[0]} for es in zip(*curves)]
    return dict(recs[0], seed="mean", label=recs[0]["label"] + " (mean)",
                wall=mean([r["wall"] for r in recs]),
                final_fid=mean([r["final_fid"] for r in recs]),
                **{key: average([r[key] for r in recs]) for key in ("log", "heldout", "evals")})


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_chart(path, series, title, xlabel, ylabel, logy=False, note=None, size=(900, 560)):
    """series: (label, xs, ys[, color index[, thin]]). Thin lines (one seed beside a mean) are a
    lighter shade without markers; a None label has no legend entry. Markers up to 30 points.
    `note` is a red banner under the title (quick mode's). The legend's width is measured: the
    picture grows to the right to hold its longest label."""
    keep = lambda y: math.isfinite(y) and (y > 0 or not logy)
    series = [(label, [float(x) for x, y in zip(xs, ys) if keep(y)],
               [float(y) for y in ys if keep(y)], *style) for label, xs, ys, *style in series]
    font = ImageFont.load_default(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_width = max([measure.textlength(s[0], font=font) for s in series if s[0] is not None],
                       default=0)
    (W, H), left, right, top, bottom = size, 80, max(200, 42 + math.ceil(legend_width) + 12), 68, 60
    W = size[0] + right - 200                                  # the plot keeps its width
    image = Image.new("RGB", (W, H), "white")
    draw = title_and_note(image, left, title, note)
    xs = [x for s in series for x in s[1]] or [0.0, 1.0]
    ys = [y for s in series for y in s[2]] or [1.0, 2.0]
    xticks, yticks = axis_ticks(min(0.0, min(xs)), max(xs)), axis_ticks(min(ys), max(ys), logy)
    fy = math.log10 if logy else float
    px = lambda x: left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * (W - left - right)
    py = lambda y: H - bottom - (fy(y) - fy(yticks[0])) / (fy(yticks[-1]) - fy(yticks[0])) * (
        H - top - bottom)
    for v in yticks:
        draw.line([left, py(v), W - right, py(v)], fill=(225, 225, 225))
        draw.text((left - 8, py(v)), f"{v:g}", fill="black", font=font, anchor="rm")
    for v in xticks:
        draw.line([px(v), top, px(v), H - bottom], fill=(235, 235, 235))
        draw.text((px(v), H - bottom + 6), f"{v:g}", fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text(((left + W - right) / 2, H - 22), xlabel, "black", ImageFont.load_default(16), "mm")
    ylabel += " (log scale)" if logy and "log" not in ylabel else ""
    draw.text((12, top - 22), ylabel, fill="black", font=font)
    legend = iter(range(len(series)))
    for i, (label, sx, sy, *style) in enumerate(series):
        index, thin = (style + [i, False][len(style):])[:2]
        color = COLORS[index % len(COLORS)]
        color = tuple(round(c + (255 - c) * 0.55) for c in color) if thin else color
        points = [(px(x), py(y)) for x, y in zip(sx, sy)]
        thick_line(image, points, color, 1.5 if thin else 2.5)
        for x, y in points if len(points) <= 30 and not thin else []:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        if label is not None:
            ly = top + 10 + 22 * next(legend)
            thick_line(image, [(W - right + 12, ly), (W - right + 36, ly)], color, 3)
            draw.text((W - right + 42, ly), label, fill="black", font=font, anchor="lm")
    image.save(path)


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


def panels(path, named_images, title, note=None, scale=2):
    """Image grids (uint8 (N, h, w, 3) each) side by side under their names, upscaled (nearest:
    pixels stay pixels)."""
    grids = [image_grid(np.asarray(images), min(10, len(images))) for _, images in named_images]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    canvas = Image.new("RGB", (sum(g.width + 20 for g in grids) + 20,
                               max(g.height for g in grids) + 96), "white")
    draw, x = title_and_note(canvas, 20, title, note), 20
    for (name, _), grid in zip(named_images, grids):
        draw.text((x, 62), name, fill="black", font=ImageFont.load_default(14))
        canvas.paste(grid, (x, 84))
        x += grid.width + 20
    canvas.save(path)


def title_and_note(image, x, title, note):
    """Every picture's title, and under it the note (quick mode's banner) in red."""
    draw = ImageDraw.Draw(image)
    draw.text((x, 12), title, fill="black", font=ImageFont.load_default(16))
    draw.text((x, 36), note or "", fill=(200, 0, 0), font=ImageFont.load_default(12))
    return draw


def image_grid(images, ncol=10, pad=2):
    """uint8 (N, h, w, 3) -> one PIL image, ncol per row."""
    n, h, w, _ = images.shape
    grid = np.full((-(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = image
    return Image.fromarray(grid)


def table(headers, rows):
    """Plain-text table lines, columns padded to their widest cell."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]
