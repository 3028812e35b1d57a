"""The CPU study behind the README's Results: does SRA 2 help at this scale, and what decides it?

    python results/study.py run [NAME ...] [--lanes 2] [--data DIR] [--work DIR]   # train (resumable)
    python results/study.py table [--work DIR]                                     # records, table, chart

Every run is one `tiny_demo.py` command (printed in the table beside its numbers). Runs that share
a seed share the SiT init, the batches and the noise, so each SRA 2 variant is compared with the
baseline of the same seed and settings on identical draws. Settings are chosen on seeds 0 and 1
with the held-out loss only; the chosen setting is then checked with FID on seeds 2, 3 and 4.
`run` works through the runs not yet finished, `lanes` processes at a time, one thread each
unless `--threads` says otherwise. `run preset-cpu`, alone on the machine, times the cpu preset as
shipped (not in the queue).
"""
import argparse
import json
import math
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# The screen: the 'tiny' SiT (4 blocks, D = 128), 800 steps of 64, held-out loss at 8 checkpoints.
SCREEN = ["--preset", "cpu", "--model", "tiny", "--steps", "800", "--evals", "0", "--heldout-evals", "8"]
# name: (what it varies, flags beyond SCREEN, the baseline it is compared with)
VARIANTS = {
    "base":       ("baseline", ["--runs", "baseline"], None),
    "base2":      ("baseline, stage 1 trained again", ["--runs", "baseline"], None),
    "sra":        ("paper default (block 2, lambda 1, P 5x2D)", ["--runs", "sra2"], "base"),
    "clip_sep":   ("clip SiT and P apart", ["--runs", "sra2", "--clip", "separate"], "base"),
    "lam0.1":     ("lambda 0.1", ["--runs", "sra2", "--lam", "0.1"], "base"),
    "block1":     ("block 1 (of 4)", ["--runs", "sra2", "--align-depth", "1"], "base"),
    "width_D":    ("P width D", ["--runs", "sra2", "--mlp-width", "128"], "base2"),
    "noclip_base": ("baseline, no clipping", ["--runs", "baseline", "--clip", "none"], None),
    "noclip":     ("no clipping", ["--runs", "sra2", "--clip", "none"], "noclip_base"),
    "lam0.5":     ("lambda 0.5", ["--runs", "sra2", "--lam", "0.5"], "base2"),
    "depth2":     ("P 2 layers", ["--runs", "sra2", "--mlp-depth", "2"], "base2"),
    "block3":     ("block 3 (of 4)", ["--runs", "sra2", "--align-depth", "3"], "base2"),
    "scale0.25":  ("target x 0.25", ["--runs", "sra2", "--target-scale", "0.25"], "base2"),
    "scale4":     ("target x 4", ["--runs", "sra2", "--target-scale", "4"], "base2"),
    "sample":     ("posterior sample as the target", ["--runs", "sra2", "--target", "sample"], "base2"),
    "lr1e-3_base": ("baseline, lr 1e-3", ["--runs", "baseline", "--lr", "1e-3"], None),
    "lr1e-3":     ("lr 1e-3", ["--runs", "sra2", "--lr", "1e-3"], "lr1e-3_base"),
    "small_base": ("baseline, small SiT (8 blocks)", ["--runs", "baseline", "--model", "small"], None),
    "small":      ("small SiT (8 blocks), paper default", ["--runs", "sra2", "--model", "small"], "small_base"),
}
SCREEN_SEEDS = (0, 1)
# The queue: the most telling variants first, both seeds of each before the next.
QUEUE = [f"{name}-s{seed}" for name in VARIANTS for seed in SCREEN_SEEDS]
# The confirmation: the cpu preset (the 8-block 'small' SiT, 1,200 steps, FID-250 at 3
# checkpoints), baseline and SRA 2 with the setting the screen chose, on seeds that chose nothing.
# Chosen: lambda 0.1, the only variant of the first three (paper default, separate clipping,
# lambda 0.1) whose held-out gap was below 0 on both screen seeds; of the variants run later, none
# was below 0 on both seeds either.
CONFIRM_FLAGS = ["--preset", "cpu", "--lam", "0.1"]
CONFIRM_SEEDS = (2, 3, 4)
CONFIRM = [f"confirm-s{seed}" for seed in CONFIRM_SEEDS]
# How the machine was shared while each confirmation pair ran (its wall time depends on it).
CONFIRM_CONDITIONS = {
    2: "one thread, beside seed 3's pair, FID reference computed in the run",
    3: "one thread, beside seed 2's pair, FID reference computed in the run",
    4: "the preset's two threads, alone on the machine, FID reference computed in the run",
}
# The cpu preset as shipped, `python tiny_demo.py --preset cpu` (its two seeds and two threads), on
# an empty cache (stage 1 and the FID reference made in the run) and alone on the machine: its
# wall time is the one tiny_demo.py's --help and the README state.
PRESET = "preset-cpu"


def command(job, data=None, work=None, threads=1):
    """The tiny_demo.py command line of one job ("<variant>-s<seed>")."""
    if job == PRESET:                                          # the preset's own seeds and threads
        return ["python", "tiny_demo.py", "--preset", "cpu", "--out", f"{work}/{job}"] + (
            ["--data", str(data)] if data else []) + (["--cache", f"{work}/{job}-cache"] if work else [])
    name, seed = job.rsplit("-s", 1)
    flags = [*SCREEN, *VARIANTS[name][1]] if name in VARIANTS else CONFIRM_FLAGS
    flags = [*flags, "--seed", seed, "--threads", str(threads), "--out", f"{work}/{job}"]
    return ["python", "tiny_demo.py", *flags] + (["--data", str(data)] if data else []) + \
        (["--cache", f"{work}/cache"] if work else [])


def run(jobs, lanes, data, work, threads=1, command=command):
    """Each job not finished yet (or resumed from its checkpoint), `lanes` at a time."""
    def one(job):
        if (Path(work) / job / "results.json").is_file():
            return f"{job}: done before"
        log = Path(work) / f"{job}.log"
        with open(log, "w") as f:
            resume = ["--resume"] * any((Path(work) / job).glob("ckpt/*.pt"))     # only where there is one
            rc = subprocess.call(command(job, data, work, threads) + resume, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        return f"{job}: exit {rc} ({log})"
    with ThreadPoolExecutor(lanes) as pool:
        for line in pool.map(one, jobs):
            print(line, flush=True)


def record(job, work):
    """The small record of one finished job: settings, command, commit, machine, every checkpoint."""
    res = json.loads((Path(work) / job / "results.json").read_text())
    s = res["settings"]
    command_line = " ".join(shlex.quote(a) for a in ["python", "tiny_demo.py", *s["argv"]])
    if job == PRESET:                                      # every run of both seeds, and the wall time
        return dict(job=job, command=command_line,
                    commit=res["machine"]["commit"], machine=res["machine"], card=res["card"], data=res["data"],
                    precision=s["precision"], total_seconds=res["total_seconds"],
                    runs={f"{r['name']}-s{r['seed']}": dict(settings=r["settings"], train_seconds=r["wall"],
                                                            heldout=r["heldout"], fid=r["evals"])
                          for r in res["runs"]})
    if job in CONFIRM:                                             # both runs, and the whole pair's time
        return dict(job=job, seed=s["seed"], command=command_line,
                    commit=res["machine"]["commit"], machine=res["machine"], card=res["card"], data=res["data"],
                    pair_seconds=res["total_seconds"],
                    runs={r["name"]: dict(settings=r["settings"], train_seconds=r["wall"], heldout=r["heldout"],
                                          heldout_seconds=r.get("heldout_seconds", 0.0), fid=r["evals"],
                                          steps_above_clip=r.get("clipped", 0), final=r["log"][-1])
                          for r in res["runs"]})
    run = res["runs"][0]
    keep = ("model", "steps", "batch_size", "lr", "grad_clip", "clip", "align_depth", "lam", "mlp_depth",
            "mlp_width", "target_scale", "seed", "n_images", "heldout_n", "vae_width", "vae_steps", "threads",
            "target", "precision")
    return dict(job=job, variant=job.rsplit("-s", 1)[0], run=run["name"], seed=run["seed"],
                settings={k: s.get(k) for k in keep}, sra2=run["settings"], command=command_line,
                commit=res["machine"]["commit"], machine=res["machine"], card=res["card"], data=res["data"],
                train_seconds=run["wall"], heldout_seconds=run.get("heldout_seconds", 0.0),
                steps_above_clip=run.get("clipped", 0), heldout=run["heldout"], fid=run["evals"],
                final=run["log"][-1])


def collect(work):
    """results/study/<job>.json for every finished job; returns them by job name."""
    out, records = HERE / "study", {}
    out.mkdir(exist_ok=True)
    for job in QUEUE + CONFIRM + [PRESET]:
        if (Path(work) / job / "results.json").is_file():
            records[job] = record(job, work)
            (out / f"{job}.json").write_text(json.dumps(records[job], indent=1) + "\n")
    for path in out.glob("*.json"):                                    # collected before, on this machine
        records.setdefault(path.stem, json.loads(path.read_text()))
    return records


def load_records():
    """The records in results/study/, in queue order."""
    found = {p.stem: json.loads(p.read_text()) for p in (HERE / "study").glob("*.json")}
    return {job: found[job] for job in QUEUE + CONFIRM + [PRESET] if job in found}


def gap(sra, base, key="loss", at=-1):
    """SRA 2 against its baseline on the same draws: held-out loss ratio - 1, in percent."""
    return 100 * (sra["heldout"][at][key] / base["heldout"][at][key] - 1)


def table(records):
    """results/study.md and the charts, from the records."""
    text = study_text(records)
    (HERE / "study.md").write_text(text)
    print(text, end="")
    charts(records)


def study_text(records):
    """The text of results/study.md: one row per variant (mean over the seeds found), then one per
    job, then the confirmation."""
    mean = lambda xs: sum(xs) / len(xs)
    lines = ["# The CPU study", "",
             "Held-out loss: the denoising term on 1,000 CIFAR-10 test images at a fixed t grid and fixed noise, "
             "EMA weights, at the last step; each SRA 2 run against the baseline of the same seed and settings "
             "(same init, batches and noise). Negative: SRA 2 better. Written by `python results/study.py table`. "
             "Stage 1 was trained again on a second machine (VAE training is not bit-reproducible across "
             "machines); the runs made there are paired with `base2`, the baseline trained on those latents.",
             "", "| variant | seeds | held-out loss gap | low t | middle t | high t | gap at 1/4 of the run | "
             "time per step* | steps above the clip (base / SRA 2) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, (what, _, base_name) in VARIANTS.items():
        pairs = screen_pairs(records, name)
        if not pairs:
            continue
        cell = lambda key, at=-1: f"{mean([gap(a, b, key, at) for a, b in pairs]):+.2f}% (" + \
            ", ".join(f"{gap(a, b, key, at):+.2f}" for a, b in pairs) + ")"
        quarter = len(pairs[0][0]["heldout"]) // 4 - 1
        lines.append(f"| {what} | {', '.join(str(a['seed']) for a, _ in pairs)} | {cell('loss')} | "
                     f"{cell('low')} | {cell('middle')} | {cell('high')} | {cell('loss', quarter)} | "
                     f"{mean([100 * (a['train_seconds'] / b['train_seconds'] - 1) for a, b in pairs]):+.1f}% | "
                     + ", ".join(f"{b['steps_above_clip']} / {a['steps_above_clip']}" for a, b in pairs) + " |")
    lines += ["", "The same, short (the README's table): the mean over the seeds, at the last step and at a "
              "quarter of the run.", "", "| variant | seeds | held-out loss gap | at 1/4 of the run |", "|---|---|---|---|"]
    for name, (what, _, base_name) in VARIANTS.items():
        pairs = screen_pairs(records, name)
        if pairs:
            quarter = len(pairs[0][0]["heldout"]) // 4 - 1
            lines.append(f"| {what} | {', '.join(str(a['seed']) for a, _ in pairs)} | "
                         f"{mean([gap(a, b) for a, b in pairs]):+.2f}% | "
                         f"{mean([gap(a, b, 'loss', quarter) for a, b in pairs]):+.2f}% |")
    machine = next(iter(records.values()))["machine"]
    lines += ["", f"Machine: {machine['processor']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
              f"python {machine['python']}.",
              "", "Gaps: mean over the seeds, each seed in brackets. Low, middle, high t: the thirds of [0, 1] (t = 0 "
              "data). *Train time against the baseline's, measured while other jobs shared the 2 cores: a rough "
              "figure, not a benchmark. Steps above the clip: training steps whose gradient norm exceeded the "
              "clip (1.0), per seed. The screen: these variants on the `tiny` SiT (4 blocks), 800 steps of 64, "
              "seeds 0 and 1 (some 0 alone), judged by the held-out loss alone.",
              "", "## Every run", "", "| job | held-out loss at the last step | training denoise / align at the end | train time | "
              "held-out cost | command |", "|---|---|---|---|---|---|"]
    for job, r in records.items():
        if job in CONFIRM or job == PRESET:
            continue
        lines.append(f"| {job} | {r['heldout'][-1]['loss']:.4f} | {r['final']['denoise']:.2f} / "
                     f"{r['final']['align']:.2f} | {r['train_seconds']:.0f} s | "
                     f"{100 * r['heldout_seconds'] / r['train_seconds']:.1f}% | `{r['command']}` |")
    lines += confirm_lines({k: r for k, r in records.items() if k in CONFIRM})
    lines += preset_lines(records.get(PRESET))
    return "\n".join(lines) + "\n"


def preset_lines(r):
    """The cpu preset as shipped: its wall time, per run the held-out loss at the last step and
    FID-250 at each checkpoint, then SRA 2's held-out gap per seed and the mean final FIDs."""
    if not r:
        return []
    m = r["machine"]
    lines = ["", "## The cpu preset as shipped", "",
             f"`{r['command']}` took {r['total_seconds'] / 60:.1f} min ({preset_minutes(r)} min, "
             f"rounded) on {r['card']}, alone, with an empty cache (stage 1 and the FID reference made in "
             f"the run; CIFAR-10 and the Inception weights read from disk, not downloaded): "
             f"{m.get('cpu') or m['processor']}, "
             f"torch {m['torch']}, {r['precision']}, commit {r['commit']}.", "",
             "| run | train time | held-out loss at the last step | FID-250 at steps " + " / ".join(
                 str(e["step"]) for e in next(iter(r["runs"].values()))["fid"]) + " |", "|---|---|---|---|"]
    for name, x in r["runs"].items():
        lines.append(f"| {name} | {x['train_seconds']:.0f} s | {x['heldout'][-1]['loss']:.4f} | "
                     + " / ".join(f"{e['fid']:.1f}" for e in x["fid"]) + " |")
    seeds = [name.split("-s")[1] for name in r["runs"] if name.startswith("baseline-s")]
    seeds = [k for k in seeds if f"sra2-s{k}" in r["runs"]]                    # both runs finished
    if not seeds:
        return lines
    gaps = [gap(r["runs"][f"sra2-s{k}"], r["runs"][f"baseline-s{k}"]) for k in seeds]
    fid = lambda run: sum(r["runs"][f"{run}-s{k}"]["fid"][-1]["fid"] for k in seeds) / len(seeds)
    return lines + ["", "SRA 2's held-out gap: " + ", ".join(
        f"seed {k} {g:+.2f}%" for k, g in zip(seeds, gaps)) + f" (mean {sum(gaps) / len(gaps):+.2f}%); "
        f"FID-250 at the last step, mean of the seeds: baseline {fid('baseline'):.1f}, SRA 2 {fid('sra2'):.1f}."]


def preset_minutes(r):
    """The preset's wall time in whole minutes, as --help and the README state it."""
    return round(r["total_seconds"] / 60)


def confirm_lines(confirm):
    """The confirmation: per seed, held-out loss and FID of both runs at each checkpoint."""
    if not confirm:
        return []
    lines = ["", "## Confirmation on seeds that chose nothing", "",
             f"`{next(iter(confirm.values()))['command']}` (the seed changed); SRA 2: "
             f"{next(iter(confirm.values()))['runs']['sra2']['settings']}.", "",
             "| seed | step | held-out loss, baseline | SRA 2 | gap | FID-250, baseline | SRA 2 |", "|---|---|---|---|---|---|---|"]
    for r in confirm.values():
        base, sra = r["runs"]["baseline"], r["runs"]["sra2"]
        held = {b["step"]: (b["loss"], a["loss"]) for b, a in zip(base["heldout"], sra["heldout"])}
        fid = {b["step"]: (b["fid"], a["fid"]) for b, a in zip(base["fid"], sra["fid"])}
        for step in sorted(set(held) | set(fid)):
            h, f = held.get(step), fid.get(step)
            lines.append(f"| {r['seed']} | {step} | " +
                         (f"{h[0]:.4f} | {h[1]:.4f} | {100 * (h[1] / h[0] - 1):+.2f}% | " if h else "| | | ") +
                         (f"{f[0]:.1f} | {f[1]:.1f} |" if f else "| |"))
    lines += ["", "Wall time of one baseline + SRA 2 pair (warm stage-1 cache, the machine above): " +
              "; ".join(f"seed {r['seed']}: {r['pair_seconds'] / 60:.1f} min "
                        f"({CONFIRM_CONDITIONS.get(r['seed'], 'conditions not recorded')})"
                        for r in confirm.values()) +
              ". FID weights: the fp32 copy without fc, given by SRA2_INCEPTION_WEIGHTS.",
              "", "Speed-up as the demo reads it (where SRA 2's FID-250 curve, linear between checkpoints, "
              "last reaches the baseline's final FID): " + "; ".join(speedup(r) for r in confirm.values()) + ".",
              "", "Held-out loss cost against training time: " + ", ".join(
                  f"seed {r['seed']} {name} {100 * x['heldout_seconds'] / x['train_seconds']:.1f}%"
                  for r in confirm.values() for name, x in r["runs"].items()) + "."]
    return lines


def screen_pairs(records, name):
    """(SRA 2 record, its baseline's record) for each screen seed of variant `name` found."""
    base_name = VARIANTS[name][2]
    pairs = [(records[f"{name}-s{k}"], records[f"{base_name}-s{k}"]) for k in SCREEN_SEEDS
             if base_name and f"{name}-s{k}" in records and f"{base_name}-s{k}" in records]
    # Stage 1 (the VAE and its latents) is trained per machine and is not bit-reproducible
    # across machines: a pair must come from one machine's stage 1.
    assert all(a["machine"]["platform"] == b["machine"]["platform"] for a, b in pairs), name
    return pairs


def gap_chart(path, rows, title):
    """rows: (label, [gap per seed]). One bar per row (the mean), a dot per seed, 0 marked."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=14)
    left, width, row, top = 330, 520, 26, 56
    values = [g for _, gaps in rows for g in gaps] + [0.0]
    lo, hi = math.floor(min(values) * 2) / 2, math.ceil(max(values) * 2) / 2
    x = lambda g: left + (g - lo) / (hi - lo) * width
    img = Image.new("RGB", (left + width + 40, top + row * len(rows) + 50), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 12), title, fill="black", font=font)
    for k in range(round((hi - lo) * 2) + 1):                       # gridlines every 0.5%
        g, bottom = lo + k / 2, top + row * len(rows)
        draw.line([(x(g), top - 4), (x(g), bottom)], fill=(120, 120, 120) if g == 0 else (225, 225, 225),
                  width=2 if g == 0 else 1)
        draw.text((x(g), bottom + 6), f"{g:+.1f}%", fill="black", font=font, anchor="ma")
    for i, (label, gaps) in enumerate(rows):
        mid, mean = top + row * i + row / 2, sum(gaps) / len(gaps)
        draw.text((left - 10, mid), label, fill="black", font=font, anchor="rm")
        color = (44, 160, 44) if mean < 0 else (214, 39, 40)
        draw.rectangle([min(x(0), x(mean)), mid - 7, max(x(0), x(mean)), mid + 7], fill=color)
        for g in gaps:
            draw.ellipse([x(g) - 4, mid - 4, x(g) + 4, mid + 4], fill="black")
    img.save(path)


def speedup(r):
    """Where SRA 2's FID curve reaches the baseline's final FID, read as the demo reads it
    (tiny_demo.reach: linear between checkpoints, the last crossing)."""
    import tiny_demo
    base, sra = r["runs"]["baseline"]["fid"], r["runs"]["sra2"]["fid"]
    x, _ = tiny_demo.reach([e["step"] for e in base], [e["fid"] for e in sra], base[-1]["fid"])
    return (f"seed {r['seed']}: " + (f"at step {x:.0f} of {base[-1]['step']} ({base[-1]['step'] / x:.2f}x)"
            if x is not None else f"none (SRA 2 ends at {sra[-1]['fid']:.1f}, the baseline at {base[-1]['fid']:.1f})"))


def charts(records):
    """results/study_gap.png: each variant's held-out gap against its baseline at the last step,
    the mean (bar) and each screen seed (dot); results/confirm_*.png: both runs of the
    confirmation, mean (thick) and each seed (thin)."""
    import demo_infra
    rows = [(what, [gap(a, b) for a, b in screen_pairs(records, name)]) for name, (what, _, _) in VARIANTS.items()]
    rows = [(what.split(" (")[0], gaps) for what, gaps in rows if gaps]
    if rows:
        gap_chart(HERE / "study_gap.png", rows, "SRA 2 against its baseline: held-out loss gap at the last step "
                  "(below 0: SRA 2 better)\ndots: each seed run (0 and 1, or 0 alone); bar: their mean")
    confirm = [r for k, r in records.items() if k in CONFIRM]
    series = []                                   # how the gap moves with training steps
    for i, name in enumerate(("sra", "lam0.1", "small")):
        pairs = screen_pairs(records, name)
        if pairs:
            steps = [e["step"] for e in pairs[0][0]["heldout"]]
            seeds = ", ".join(str(a["seed"]) for a, _ in pairs)
            series.append((f"{VARIANTS[name][0].split(' (')[0][:18]}, screen, seed{'s' * (len(pairs) > 1)} {seeds}", steps,
                           [sum(gap(a, b, "loss", j) for a, b in pairs) / len(pairs) for j in range(len(steps))], i))
    for i, r in enumerate(confirm):
        base, sra = r["runs"]["baseline"]["heldout"], r["runs"]["sra2"]["heldout"]
        series.append((f"lambda 0.1, cpu, seed {r['seed']}", [e["step"] for e in base],
                       [100 * (a["loss"] / b["loss"] - 1) for a, b in zip(sra, base)], 3 + i))
    if series:
        series.append((None, [0, max(s[1][-1] for s in series)], [0, 0], 7, True))
        demo_infra.line_chart(HERE / "study_steps.png", series, "SRA 2 against its baseline: held-out loss gap "
                             "(%, below 0: SRA 2 better); screen: the mean of the seeds named", "training steps", "gap (%)")
    for key, metric, label in (("heldout", "loss", "held-out loss"), ("fid", "fid", "FID-250 (25-step SDE)")):
        series = []
        for i, name in enumerate(("baseline", "sra2")):
            curves = [[e[metric] for e in r["runs"][name][key]] for r in confirm]
            if not curves:
                continue
            steps = [e["step"] for e in confirm[0]["runs"][name][key]]
            series.append((("baseline" if name == "baseline" else "SRA 2") + f", mean of seeds "
                           + ", ".join(str(r["seed"]) for r in confirm), steps,
                           [sum(c) / len(c) for c in zip(*curves)], i))
            series += [(None, steps, c, i, True) for c in curves]
        if series:
            demo_infra.line_chart(HERE / f"confirm_{key}.png", series, f"{label}, cpu preset, SRA 2 with lambda 0.1 "
                                 "(2 CPU cores)", "training steps", label, logy=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("run", "table"))
    p.add_argument("jobs", nargs="*", help="jobs to run, e.g. sra-s0 (default: the whole queue)")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per run (%(default)s)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: tiny_demo.py downloads it)")
    p.add_argument("--work", default=str(REPO / "demo_out" / "study"), help="where runs write (%(default)s)")
    a = p.parse_args(argv)
    if a.what == "run":
        if PRESET in a.jobs and (len(a.jobs) > 1 or any(
                (Path(a.work) / name).exists() for name in (PRESET, f"{PRESET}-cache"))):
            sys.exit(f"{PRESET} is timed alone and from an empty cache: run it by itself, "
                     f"without {a.work}/{PRESET} or {a.work}/{PRESET}-cache")
        run(a.jobs or QUEUE, a.lanes, a.data, a.work, a.threads)
    else:
        collect(a.work)
        table(load_records())


if __name__ == "__main__":
    main()
