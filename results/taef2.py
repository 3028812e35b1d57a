"""Stage 1 measured: TAEF2 (--vae taef2) against our own VAE (--vae own) at the cpu preset.

    python results/taef2.py [--data DIR] [--cache DIR] [--taef2 DIR] [--n 1000] [--threads 1]

Reconstruction PSNR at 32 px on the first --n CIFAR-10 test images, through each stage 1 as the
demo uses it: tiny_demo.encode, the cached normalisation, tiny_demo.decode to uint8 (TAEF2: the
images bicubic-upsampled to 64 px, decoded at 64 px, each 2x2 block averaged back to 32). PSNR of
the mean squared error over all the images (and the mean of the per-image PSNRs). Stage-1 time:
the seconds the cpu preset's stage 1 took when it was made (TAEF2: 10,000 training images and
their mirror images encoded), as its cache file records them; made here if --cache lacks it.
Writes results/taef2.json: settings, commit, machine and the figures.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import demo_infra                                                     # noqa: E402
import tiny_demo                                                      # noqa: E402


def psnr(stage, images, chunk=100):
    """PSNR (dB) of the stage's reconstructions of uint8 images (N, 32, 32, 3): of the mean squared
    error over all images, and the mean of the per-image PSNRs."""
    cpu, errors = torch.device("cpu"), []
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        z = (tiny_demo.encode(stage.vae, part, cpu, "PSNR")[0] - stage.shift) * stage.scale
        recon = tiny_demo.decode(stage, z).numpy().astype(np.float64)  # what the demo shows
        errors.append(((recon - part) ** 2).mean(axis=(1, 2, 3)))      # per image
    mse = np.concatenate(errors)
    db = lambda m: 10 * math.log10(255 ** 2 / m)
    return dict(psnr_db=db(mse.mean()), mean_image_psnr_db=float(np.mean([db(m) for m in mse])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: tiny_demo.py downloads)")
    p.add_argument("--cache", default=None, help="tiny_demo.py's --cache (stage-1 files)")
    p.add_argument("--taef2", default=None, help="tiny_demo.py's --taef2")
    p.add_argument("--n", type=int, default=1000, help="test images for the PSNR (%(default)s)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (%(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    record = dict(what=__doc__.splitlines()[0], machine=demo_infra.machine(),
                  threads=a.threads, load_average_at_start=os.getloadavg(), n_test_images=a.n)
    for vae in ("own", "taef2"):
        flags = ["--preset", "cpu", "--vae", vae, "--threads", str(a.threads), "--heldout-n",
                 str(a.n)] + [f"--{k}={v}" for k, v in vars(a).items()
                              if k in ("data", "cache", "taef2") and v]
        args = tiny_demo.parse_args(flags)
        tiny_demo.check(args)
        images, labels, data = tiny_demo.load_data(args)
        made_here = not tiny_demo.stage1_path(args, demo_infra.digest(
            images.tobytes(), labels.tobytes())).is_file()
        tic = time.perf_counter()
        stage = tiny_demo.stage1(images, demo_infra.digest(images.tobytes(), labels.tobytes()),
                                 args, torch.device("cpu"))
        seconds = time.perf_counter() - tic
        test_images, _, test_data = tiny_demo.load_data(args, "test")
        record[vae] = dict(flags=flags, data=data, test_data=test_data, stage1_file=stage.file,
                           latent_shape=tiny_demo.latent_shape(args),
                           stage1_seconds=stage.seconds, stage1_made_here=made_here,
                           stage1_call_seconds=seconds, **psnr(stage, test_images))
        print(vae, json.dumps(record[vae]), flush=True)
    record["load_average_at_end"] = os.getloadavg()
    (HERE / "taef2.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {HERE / 'taef2.json'}")


if __name__ == "__main__":
    main()
