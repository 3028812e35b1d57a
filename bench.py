"""bench.py: how fast sra2's SiT trains and samples, with and without SRA 2, on this machine.

    python bench.py                           # SiT-B/2 batch 256 and SiT-XL/2 batch 64 (a GPU)
    python bench.py --quick                   # tiny sizes: a smoke run on a CPU
    python bench.py --official PATH/models.py # also the official SiT code, side by side
    python bench.py --flops                   # training FLOPs per image, counted, no timing:
                                              # written to results/flops.json (--overwrite)
    python bench.py --demo                    # tiny_demo.py's models on one CPU thread, fp32
                                              # and bf16: results/cpu_steps.json (--overwrite)

A training step is forward + backward + fused AdamW on 32x32x4 latents (ImageNet 256 with the
SD-VAE), in fp32/TF32, bf16 autocast, and bf16 + torch.compile (CUDA). Every row is the median of
timed steps after warm-up, with the device synchronised around each. TFLOP/s counts the step's
FLOPs (torch's FlopCounterMode on a meta-device copy) and is set against one large matmul timed
in the same run, the practical ceiling. Beside each median: min and max of the timed steps, and a
warning where they are more than 1.5x apart (a busy machine: the row is not a measurement). The
official SiT (`--official`) is timed through the same training_loss: SRA 2 reads its blocks with
sra2.tap, no change to its code.
"""
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import demo_infra
import fid
import sra2

WIDE = 1.5                     # max / min of a row's timed steps beyond which it says so


def timed(fn, device, warmup, iters, spread=False):
    """Median seconds per call of fn() after warmup calls, synchronising the device around each;
    spread: (min, median, max)."""
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
    return (min(times), statistics.median(times), max(times)) if spread else \
        statistics.median(times)


def spread_note(low, high):
    """The min-max range of a row's steps, and a warning when it is too wide to read."""
    return f"  {1e3 * low:.1f}-{1e3 * high:.1f} ms" + (
        f"  spread {high / low:.1f}x: too wide to read (a busy machine?)" if high > WIDE * low
        else "")


def train_flops_per_image(config, sra):
    """Forward + backward FLOPs of one training image of a SiT with this SiTConfig (with SRA 2's
    default projector if sra), counted on a meta-device copy: no memory, no time, and SDPA runs
    as plain matmuls there, so attention is counted too."""
    with torch.device("meta"):
        model = sra2.SiT(config)
        projector = sra2.make_projector(model) if sra else None
        z = torch.randn(1, config.in_channels, config.input_size, config.input_size)
        y = torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            sra2.training_loss(model, z, y, projector)["loss"].backward()
    return counter.get_total_flops()


def load_official(path):
    """The official SiT models.py as a module (it needs timm, or a stand-in for its 3 classes);
    anything else is a ValueError of one line."""
    _require = fid._require
    _require(Path(path).is_file(), f"--official {path}: no such file")
    _require(path.endswith(".py"), f"--official {path}: not a Python file (SiT's models.py)")
    spec = importlib.util.spec_from_file_location("official_sit_models", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        raise ValueError(f"--official {path} needs the Python module {error.name!r} (SiT's "
                         "models.py imports timm: pip install timm)") from None
    except Exception as error:
        raise ValueError(f"--official {path} does not run ({type(error).__name__}: {error})") \
            from None
    _require(hasattr(module, "SiT"), f"--official {path}: no class SiT in it (SiT's models.py)")
    return module


def bench_train(name, batch, mode, sra, device, overrides, warmup, iters, official=None):
    """One row: images/s, peak memory and FLOP/s of a full training step (fwd, bwd, AdamW)."""
    torch.manual_seed(0)
    cfg = sra2.SiTConfig(**{**sra2.PRESETS[name], **overrides})
    if official is None:
        model = sra2.SiT(cfg).to(device)
    else:                                          # the same math, the official code
        kwargs = {k: v for k, v in vars(cfg).items() if k not in ("align_depth", "learn_sigma")}
        model = official.SiT(**kwargs, learn_sigma=False).to(device)
    out_dim = cfg.patch_size ** 2 * cfg.in_channels
    projector = sra2.Projector(cfg.hidden_size, out_dim).to(device) if sra else None
    flops = train_flops_per_image(cfg, sra)
    params = list(model.parameters()) + (list(projector.parameters()) if sra else [])
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    z = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    net = torch.compile(model, fullgraph=True) if mode == "bf16+compile" else model   # tap outside
    loss = lambda net, z, y, t, eps: sra2.training_loss(net, z, y, projector, t=t, eps=eps,
                                                        align_depth=cfg.align_depth)

    def step():
        t, eps = torch.rand(batch, device=device), torch.randn_like(z)   # outside the compiled part
        with sra2.autocast(device, enabled=mode != "fp32"):
            total = loss(net, z, y, t, eps)["loss"]
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    low, seconds, high = timed(step, device, warmup, iters, spread=True)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    compile_err = None
    if net is not model:                                           # compiled vs eager, same inputs
        t, eps = torch.rand(batch, device=device), torch.randn_like(z)
        with torch.no_grad():                                      # far from the zero-output init
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        y_null = torch.full_like(y, cfg.num_classes)              # label dropout changes nothing
        with torch.no_grad(), sra2.autocast(device):
            a, b = loss(net, z, y_null, t, eps), loss(model, z, y_null, t, eps)
        compile_err = max(abs(a[k].item() - b[k].item()) / abs(b[k].item())
                          for k in ("denoise", "align") if b[k])
    return dict(model=name + (" (official)" if official else ""), batch=batch, mode=mode, sra2=sra,
                img_s=batch / seconds, ms=1e3 * seconds, peak_gib=peak, compile_err=compile_err,
                low=low, high=high,
                tflops=flops * batch / seconds / 1e12)


def bench_sampler(name, batch, steps, compiled, device, overrides, iters):
    model = sra2.create_sit(name, **overrides).to(device).eval()
    cfg = model.config
    model = torch.compile(model) if compiled else model
    noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    run = lambda: sra2.sample_sde(model, noise, y, num_steps=steps)
    with sra2.autocast(device):
        seconds = timed(run, device, warmup=1, iters=iters)
    return dict(model=name, batch=batch, steps=steps, compiled=compiled, img_s=batch / seconds,
                s=seconds)


def matmul_ceiling(device, n):
    """TFLOP/s of one large bf16 (CPU: fp32) matmul: the practical ceiling for this device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, warmup=3, iters=10) / 1e12


def benchmark(device, quick=False, official_path=None):
    """Training-step and sampler throughput; returns the rows it prints."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True                   # "fp32" means fp32/TF32, as SiT
    torch.backends.cudnn.allow_tf32 = True
    try:
        return _benchmark(device, quick, load_official(official_path) if official_path else None)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _benchmark(device, quick, official):
    if quick:                                                      # a 4-block S/2 on 8x8 latents
        overrides = dict(input_size=8, num_classes=10, depth=4, hidden_size=128, num_heads=2)
        warmup, iters, cases, sampler = 1, 3, [("SiT-S/2", 8)], ("SiT-S/2", 8, 10)
        modes = ["fp32", "bf16"]
    else:                                                          # ImageNet 256: 32x32x4 latents
        overrides = dict(input_size=32, num_classes=1000)
        warmup, iters, sampler = 5, 10, ("SiT-B/2", 256, 250)
        cases = [("SiT-B/2", 256), ("SiT-XL/2", 64)]
        modes = ["fp32", "bf16"] + (["bf16+compile"] if device.type == "cuda" else [])
    ceiling = matmul_ceiling(device, 1024 if quick else 8192)
    threads = f"cpu, {torch.get_num_threads()} threads"
    card = torch.cuda.get_device_name() if device.type == "cuda" else threads
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"device {device} ({card}), torch {torch.__version__}; ceiling: one large {precision} "
          f"matmul, {ceiling:.3g} TFLOP/s", flush=True)
    if quick:
        print(f"quick mode: a smoke run, the models are shrunk to {overrides}")
    print(f"{'model':<20}{'batch':>6}  {'mode':<13}{'SRA 2':<7}{'img/s':>9}{'ms/step':>9}"
          f"{'peak GiB':>10}{'TFLOP/s':>9}{'of ceil':>8}")
    rows = []
    for name, batch in cases:
        variants = [(m, s, None) for m in modes for s in (False, True)]
        variants += [(m, s, official) for m in modes for s in (False, True) if official]
        for mode, sra, off in variants:
            r = bench_train(name, batch, mode, sra, device, overrides, warmup, iters, off)
            rows.append(r)
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            err = r["compile_err"]
            print(f"{r['model']:<20}{batch:>6}  {mode:<13}{'on' if sra else 'off':<7}"
                  f"{r['img_s']:>9.1f}{r['ms']:>9.1f}{peak:>10}{r['tflops']:>9.3g}"
                  f"{r['tflops'] / ceiling:>8.0%}" + spread_note(r["low"], r["high"])
                  + (f"  compiled vs eager loss: {err:.1e} relative" if err is not None else ""),
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    name, batch, steps = sampler
    for compiled in [False] + ([True] if device.type == "cuda" else []):
        r = bench_sampler(name, batch, steps, compiled, device, overrides, iters=2 if quick else 1)
        rows.append(r)
        print(f"sampler {name} batch {batch}, {steps}-step Euler-Maruyama, bf16"
              f"{' + compile' if compiled else ''}: {r['img_s']:.1f} img/s "
              f"({r['s']:.2f} s per batch)",
              flush=True)
    return rows


def demo_steps(device, warmup=2, iters=8):
    """Seconds per training step (batch 64, the demo's 16x16x4 latents, 10 classes) of each of
    tiny_demo.py's models, SRA 2 off and on, fp32 and bf16 autocast; the rows it prints."""
    import tiny_demo
    rows = []
    print(f"{'model':<8}{'mode':<6}{'SRA 2':<7}{'ms/step':>9}")
    for model, (name, overrides) in tiny_demo.DEMO_MODELS.items():
        overrides = dict(overrides, input_size=16, in_channels=4, num_classes=10)
        for mode in ("fp32", "bf16"):
            for sra in (False, True):
                r = bench_train(name, 64, mode, sra, device, overrides, warmup, iters)
                rows.append(dict(model=model, mode=mode, sra2=sra, ms=round(r["ms"], 1),
                                 low=round(1e3 * r["low"], 1), high=round(1e3 * r["high"], 1)))
                print(f"{model:<8}{mode:<6}{'on' if sra else 'off':<7}{r['ms']:>9.1f}"
                      + spread_note(r["low"], r["high"]), flush=True)
    return rows


def write_record(path, command, settings, figures):
    where = demo_infra.machine()
    record = dict(command=command, machine=where, commit=where["commit"], settings=settings,
                  figures=figures)
    fid.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"written to {path}")


def main(argv=None):
    parser = fid.OneLineParser(prog="bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best one)")
    parser.add_argument("--official", default=None, metavar="MODELS_PY",
                        help="also time the official SiT models.py (needs timm; not committed)")
    parser.add_argument("--flops", action="store_true", help="training GFLOP per image, no "
                        "timing, written to results/flops.json (a committed record: refused if it "
                        "exists, unless --overwrite)")
    parser.add_argument("--demo", action="store_true", help="tiny_demo.py's models on one CPU "
                        "thread, fp32 and bf16: written to results/cpu_steps.json (refused if it "
                        "exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a committed record")
    args = parser.parse_args(argv)
    record_path = Path(__file__).resolve().parent.joinpath(
        "results", "cpu_steps.json" if args.demo else "flops.json")
    if (args.flops or args.demo) and record_path.is_file() and not args.overwrite:
        parser.error(f"{record_path} exists (the committed record); pass --overwrite to "
                     "replace it, or move it away")
    if args.demo:
        torch.set_num_threads(1)                       # as the depth study's runs: one thread each
        rows = demo_steps(torch.device("cpu"))
        return write_record(record_path, "python bench.py --demo", "one CPU thread, batch 64, "
                            "16x16x4 latents, 10 classes, fwd + bwd + AdamW; median of 8 steps "
                            f"after 2; native bf16: {sra2.default_precision('cpu') == 'bf16'}", rows)
    if args.flops:                                     # counts, not timings: any machine gives them
        figures = {}
        for name in ("SiT-B/2", "SiT-L/2", "SiT-XL/2"):
            cfg = sra2.SiTConfig(**sra2.PRESETS[name])
            base, sra = (train_flops_per_image(cfg, s) / 1e9 for s in (False, True))
            figures[name] = dict(gflop_per_image=round(base, 1), with_sra2=round(sra, 1),
                                 extra=f"+{100 * (sra / base - 1):.1f}%")
            print(f"{name}: {base:.1f} GFLOP per image per training step, {sra:.1f} with SRA 2 "
                  f"({figures[name]['extra']})")
        return write_record(record_path, "python bench.py --flops", "forward + backward per "
                            "image, 32x32x4 latents, 1000 classes, SRA 2's default projector (5 "
                            "layers, width 2D) at the preset's block", figures)
    try:
        device = fid._check_device(args.device or sra2.pick_device())
        args.official and load_official(args.official)            # its problems first, in a line
    except ValueError as error:
        parser.error(str(error))
    benchmark(device, quick=args.quick, official_path=args.official)


if __name__ == "__main__":
    main()
