"""The depth study: does SRA 2 help where the paper uses it (deep SiTs), and is it the VAE latent?

    python results/depth.py run [JOB ...] [--lanes 2] [--data DIR] [--work DIR]   # train (resumable)
    python results/depth.py table [--work DIR]                                     # records, table, chart

tiny_demo.py's depth sweep: 6, 12 and 24 blocks of width 64, and 3, 6 and 12 of width 128 (24x64
and 6x128 cost about the same per step, as do 12x64 and 3x128). Each model is trained four ways on
the same init, batches and noise (the screen protocol of results/study.py: 800 steps of 64,
held-out loss at 8 checkpoints, fp32): the baseline; SRA 2 at the paper's fraction of depth
(1/6 up to 12 blocks, 2 of 12 as for S and B; 1/3 from 24 on, 8 of 24 as for L); SRA 2 at the
other fraction; and the control, aligned at the paper's block to another image's latent (the
batch rolled by one), which has the latents' statistics and none of this image's information.
The 24x64 SiT is also trained the first three ways on the latents of the pretrained TAEF2
(`--vae taef2`; rows 24x64-taef2), and for 5,000 steps on seed 0 (jobs 24x64-5k-*). The
baseline, SRA 2 and the control are also trained, with FID, on fresh seeds: 2, 3 and 4 for 24x64,
2 for 12x128. A gap is read only against the baseline trained on the same stage 1 (each record's
`data` names its file, shift and scale): stage 1 is not bit-reproducible across machines, and the
own-VAE 24x64 runs on seeds 0 and 1 were made on another machine than the other runs.
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]                            # study.py, tiny_demo.py
import study                                                          # noqa: E402
import tiny_demo                                                      # noqa: E402

PROTOCOL = ["--preset", "cpu", "--steps", "800", "--evals", "0", "--heldout-evals", "8",
            "--precision", "fp32"]
MODELS = ["24x64", "12x64", "6x64", "6x128", "3x128", "12x128"]
# The tables' order: by width, the deepest first; -taef2: on the pretrained TAEF2's latents.
ROWS = sorted(MODELS, key=lambda m: (int(m.split("x")[1]), -int(m.split("x")[0]))) + ["24x64-taef2"]
SEEDS = (0, 1)
FRESH = (2, 3, 4)               # chose nothing: the confirmation of 24x64, with FID at 3 checkpoints
LONG = ["--steps", "5000", "--heldout-evals", "10"]       # 24x64-5k: the long run, seed 0


def blocks(model):
    """(the paper's block, the other block) of a model of the sweep."""
    model = model.split("-")[0]                                        # 24x64-taef2: 24x64
    depth, paper = (tiny_demo.DEMO_MODELS[model][1][k] for k in ("depth", "align_depth"))
    other = depth // 3 if depth <= 12 else depth // 6
    return paper, other if other != paper else paper + 1


def variants(model):
    """name: (what, flags beyond PROTOCOL)."""
    paper, other = blocks(model)
    return {"base": ("baseline", ["--runs", "baseline"]),
            f"b{paper}": (f"SRA 2, block {paper} (the paper's fraction)", ["--runs", "sra2"]),
            f"b{other}": (f"SRA 2, block {other}", ["--runs", "sra2", "--align-depth", str(other)]),
            f"ctl{paper}": (f"control, block {paper}", ["--runs", "sra2", "--target", "other"])}


def trio(model):
    """(variant, label) of the three main runs: the baseline, SRA 2 at the paper's block, the
    control at the same block."""
    paper = blocks(model)[0]
    return [("base", "baseline"), (f"b{paper}", f"SRA 2, block {paper}"),
            (f"ctl{paper}", f"control, block {paper}")]


def command(job, data=None, work=None, threads=1):
    """The tiny_demo.py command line of one job ("<model>[-taef2|-5k]-<variant>-s<seed>"; taef2:
    stage 1 is the pretrained TAEF2, not the demo's own VAE; 5k: 5,000 steps, 10 checkpoints)."""
    name, seed = job.rsplit("-s", 1)
    model, variant = name.rsplit("-", 1)
    model, _, tag = model.partition("-")
    flags = [*PROTOCOL, "--model", model, *variants(model)[variant][1], "--seed", seed,
             *(["--vae", tag] if tag == "taef2" else []), *(LONG if tag == "5k" else []),
             *(["--evals", "3"] if int(seed) in FRESH else []),
             "--threads", str(threads), "--out", f"{work}/{job}"]
    return ["python", "tiny_demo.py", *flags] + (["--data", str(data)] if data else []) + \
        (["--cache", f"{work}/cache"] if work else [])


# The queue, the most telling first: for every model (the deepest first) the baseline, SRA 2 at
# the paper's block and the control on both seeds; the same three of 24x64 on TAEF2's latents,
# and on the fresh seeds; the same three of 24x64 for 5,000 steps on seed 0; then 12x128 (which
# costs two 24x64s) and SRA 2 at the other block; last, the three of 12x128 on fresh seed 2, with
# FID (12x128 on seed 1 is the one model and seed where SRA 2 ended ahead of the control).
def jobs(models, pick, vae="", seeds=SEEDS):
    return [f"{model}{vae}-{variant}-s{seed}" for model in models for seed in seeds
            for variant in pick(list(variants(model)))]


MAIN = lambda v: [v[0], v[1], v[3]]
QUEUE = (jobs(MODELS[:-1], MAIN) + jobs(["24x64"], MAIN, "-taef2") + jobs(["24x64"], MAIN,
         seeds=FRESH) + jobs(["24x64"], MAIN, "-5k", seeds=(0,)) + jobs(MODELS[-1:], MAIN)
         + jobs(MODELS, lambda v: [v[2]]) + jobs(["12x128"], MAIN, seeds=FRESH[:1]))


def collect(work):
    """results/depth/<job>.json for every finished job; returns all records found there."""
    out = HERE / "depth"
    out.mkdir(exist_ok=True)
    for job in QUEUE:
        if (Path(work) / job / "results.json").is_file():
            record = study.record(job, work)
            (out / f"{job}.json").write_text(json.dumps(record, indent=1) + "\n")
    return load_records()


def load_records():
    """The records in results/depth/, by job name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "depth").glob("*.json"))}


def readme_rows(records):
    """The README's table: per model, SRA 2 at the paper's block and the control against the
    baseline at the last step and at a quarter of the run, mean (seed 0, seed 1)."""
    rows = ["| SiT (blocks x width) | block | SRA 2, step 800 | control, step 800 | SRA 2, "
            "step 200 | control, step 200 |", "|---|---|---|---|---|---|"]
    for model in ROWS:
        paper = blocks(model)[0]
        cells = [cell(gaps(records, model, v, at)) for at in (-1, 1) for v in (f"b{paper}",
                                                                           f"ctl{paper}")]
        if any(cells):
            name = model.replace("-taef2", ", TAEF2's latents")
            rows.append(f"| {name} | {paper} | " + " | ".join(cells) + " |")
    return rows


def unpaired(records):
    """Jobs whose baseline (same model and seed) was trained on other latents: stage 1 is not
    bit-reproducible across machines, so a gap is only read between runs on the same stage 1
    (the record's `data` names its file, shift and scale)."""
    base = lambda job: job.rsplit("-", 2)[0] + "-base-" + job.rsplit("-", 1)[1]
    return [job for job, r in records.items()
            if base(job) in records and r["data"] != records[base(job)]["data"]]


def fresh_rows(records, model="24x64"):
    """The fresh seeds: per seed and run the held-out gap at the last step, FID-250 at each
    checkpoint, and the demo's speed-up reading (tiny_demo.reach: where the run's FID curve last
    crosses the baseline's final FID); with two or more seeds that have all three runs, a mean
    row per run over those seeds (the gaps' mean, and the reading on the mean FID curves)."""
    runs = trio(model)

    def row(seed, what, fids, base_fids, gap):
        x = tiny_demo.reach(steps, fids, base_fids[-1])[0]
        reading = "-" if gap is None else f"{steps[-1] / x:.2f}x" if x else "never"
        return (f"| {seed} | {what} | " + ("-" if gap is None else f"{gap:+.2f}%") + " | "
                + " / ".join(f"{f:.1f}" for f in fids) + f" | {reading} |")

    rows, full = [], []
    for k in FRESH:
        base = records.get(f"{model}-base-s{k}")
        if not base:
            continue
        steps = [e["step"] for e in base["fid"]]
        for variant, what in runs:
            run = records.get(f"{model}-{variant}-s{k}")
            if run:
                rows.append(row(k, what, [e["fid"] for e in run["fid"]],
                                [e["fid"] for e in base["fid"]],
                                None if run is base else study.gap(run, base, "loss", -1)))
        if all(f"{model}-{v}-s{k}" in records for v, _ in runs):
            full.append(k)
    if not rows:
        return []
    if len(full) > 1:
        mean = lambda xs: sum(xs) / len(xs)
        curve = lambda v: [mean([records[f"{model}-{v}-s{k}"]["fid"][i]["fid"] for k in full])
                           for i in range(len(steps))]
        for variant, what in runs:
            gap = None if variant == "base" else mean(
                [study.gap(records[f"{model}-{variant}-s{k}"], records[f"{model}-base-s{k}"],
                           "loss", -1) for k in full])
            rows.append(row("mean of " + ", ".join(map(str, full)), what, curve(variant),
                            curve("base"), gap))
    return ["| seed | run | held-out gap, step 800 | FID-250 at steps " + " / ".join(
        map(str, steps)) + " | speed-up to the baseline's final FID |",
        "|---|---|---|---|---|", *rows]


def long_rows(records, model="24x64-5k"):
    """The long run, per checkpoint: the baseline's held-out loss, the gaps of SRA 2 and the
    control against it, and SRA 2 - control (above 0: the control is ahead)."""
    runs = trio(model)
    base, sra, ctl = (records.get(f"{model}-{v}-s0") for v, _ in runs)
    if not (base and (sra or ctl)):
        return []
    rows = ["| step | baseline's held-out loss | " + " | ".join(what for _, what in runs[1:])
            + " | SRA 2 - control |", "|---|---|---|---|---|"]
    for at, e in enumerate(base["heldout"]):
        g = [study.gap(run, base, "loss", at) if run and at < len(run["heldout"]) else None
             for run in (sra, ctl)]
        rows.append(f"| {e['step']} | {e['loss']:.4f} | " + " | ".join(
            "" if x is None else f"{x:+.2f}%" for x in g + [None if None in g else g[0] - g[1]])
            + " |")
    return rows


def equal_time(records, steps=None):
    """Every baseline, and SRA 2 and the control of 24x64 on the fresh seeds, on one stage 1: its
    time per step (results/cpu_steps.json: one thread, fp32, no other work; `steps` overrides),
    the time of 800 steps, and the held-out loss at step 800 (mean of its seeds)."""
    if steps is None:
        steps = json.loads((HERE / "cpu_steps.json").read_text())["figures"]
    ms = {(r["model"], r["sra2"]): r["ms"] for r in steps if r["mode"] == "fp32"}
    fresh = [f"24x64-{v}-s{k}" for v, _ in trio("24x64") for k in FRESH]
    if not any(job in records for job in fresh):
        return []
    data = next(records[job]["data"] for job in fresh if job in records)
    rows = ["| SiT | run | seeds | ms per step | 800 steps | held-out loss at 800 |",
            "|---|---|---|---|---|---|"]
    for model in MODELS:
        for variant, what in trio("24x64"):
            sra = variant != "base"
            runs = {k: records[j] for k in SEEDS + FRESH if (j := f"{model}-{variant}-s{k}") in
                    records and records[j]["data"] == data}
            if runs and (model, sra) in ms:
                loss = sum(r["heldout"][-1]["loss"] for r in runs.values()) / len(runs)
                rows.append(f"| {model} | {what} | {', '.join(map(str, runs))} | "
                            f"{ms[model, sra]:.0f} | {0.8 * ms[model, sra]:.0f} s | {loss:.4f} |")
    return rows


def control_ahead(records, models):
    """(checkpoints at which SRA 2 is behind the control, checkpoints compared): every model,
    seed 0 and 1, and checkpoint."""
    diffs = []
    for model in models:
        paper = blocks(model)[0]
        for at in range(int(PROTOCOL[PROTOCOL.index("--heldout-evals") + 1])):
            sra, ctl = gaps(records, model, f"b{paper}", at), gaps(records, model, f"ctl{paper}", at)
            diffs += [sra[k] - ctl[k] for k in sra if k in ctl]
    return sum(d > 0 for d in diffs), len(diffs)


def gaps(records, model, variant, at=-1):
    """{seed: held-out gap (%) of variant against the baseline of the same model and seed}."""
    pairs = {k: (records.get(f"{model}-{variant}-s{k}"), records.get(f"{model}-base-s{k}"))
             for k in SEEDS}
    return {k: study.gap(a, b, "loss", at) for k, (a, b) in pairs.items() if a and b}


def cell(by_seed):
    """'mean (seed 0, seed 1)' of gaps in percent, or '' where none finished."""
    if not by_seed:
        return ""
    values = list(by_seed.values())
    return f"{sum(values) / len(values):+.2f}% (" + ", ".join(f"{g:+.2f}" for g in values) + ")"


def text(records):
    """The text of results/depth.md."""
    lines = ["# The depth study", "", __doc__.split("\n\n", 2)[2].strip(), "",
             "Held-out gap: the denoising loss on 1,000 CIFAR-10 test images (fixed t grid and "
             "noise, EMA weights) of a run against the baseline of the same model and seed, at "
             "the last step (800) and at a quarter of the run (step 200); negative: better than "
             "the baseline. Mean over the seeds, each seed in brackets. Written by "
             "`python results/depth.py table`.", "",
             "| model (blocks x width) | SRA 2, paper's block | control, same block | SRA 2 - control | "
             "SRA 2, other block | at step 200: SRA 2 | control | baseline's held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for model in ROWS:
        paper, other = blocks(model)
        sra, ctl = gaps(records, model, f"b{paper}"), gaps(records, model, f"ctl{paper}")
        both = {k: sra[k] - ctl[k] for k in sra if k in ctl}
        base = [records[f"{model}-base-s{k}"]["heldout"][-1]["loss"] for k in SEEDS
                if f"{model}-base-s{k}" in records]
        if not base:
            continue
        lines.append(f"| {model} | block {paper}: {cell(sra)} | {cell(ctl)} | "
                     f"{cell(both)} | block {other}: {cell(gaps(records, model, f'b{other}'))} | "
                     f"{cell(gaps(records, model, f'b{paper}', 1))} | "
                     f"{cell(gaps(records, model, f'ctl{paper}', 1))} | "
                     + ", ".join(f"{x:.4f}" for x in base) + " |")
    for vae, models in (("the demo's VAE", MODELS), ("TAEF2", ["24x64-taef2"])):
        behind, compared = control_ahead(records, models)
        if compared:
            lines += ["", f"On {vae}'s latents, SRA 2 is behind the control (SRA 2 - control > 0) "
                      f"at {behind} of {compared} checkpoints (every model, seed 0 and 1, and "
                      "checkpoint)."]
    lines += ["", "## In the README", "", *readme_rows(records)]
    at_equal_time, fresh = equal_time(records), fresh_rows(records)
    if at_equal_time:
        lines += ["", "## At equal CPU time", "", "The runs on the fresh seeds' stage 1 (the "
                  "same latents), each at its time per training step, measured alone on one "
                  "thread by `python bench.py --demo` (results/cpu_steps.json).", "",
                  *at_equal_time]
    if fresh:
        lines += ["", "## Fresh seeds: 24x64, block 8, with FID", "", "Seeds 2, 3 and 4 chose "
                  "nothing. FID-250: 250 EMA samples (25-step SDE, no CFG) against 1,000 training "
                  "images, tiny_demo.py's checkpoint FID. Speed-up: the baseline's steps over "
                  "the step where the run's FID curve last reaches the baseline's final FID "
                  "(linear between checkpoints); never: it ends above.", "", *fresh]
    fresh = fresh_rows(records, "12x128")
    if fresh:
        lines += ["", "## Fresh seed 2: 12x128, block 2, with FID", "", "12x128 on seed 1 is "
                  "the one model and seed where SRA 2 ended ahead of the control; seed 2 chose "
                  "nothing. FID-250 and the speed-up as above.", "", *fresh]
    long = long_rows(records)
    if long:
        lines += ["", "## The long run: 24x64, 5,000 steps, seed 0", "", "Does the gap close, "
                  "hold or flip, and does the latent's information start to matter (SRA 2 "
                  "ahead of the control) as training goes on? The protocol above, 5,000 steps "
                  "with 10 held-out checkpoints, on the fresh seeds' stage 1.", "", *long]
    lines += ["", "## The gap at each checkpoint", "", "| model | run | seed | " + " | ".join(
        f"step {e['step']}" for e in next(iter(records.values()))["heldout"]) + " |",
        "|---|---|---|" + "---|" * len(next(iter(records.values()))["heldout"])]
    for model in ROWS:
        for variant, (what, _) in list(variants(model).items())[1:]:
            for k in SEEDS:
                run, base = records.get(f"{model}-{variant}-s{k}"), records.get(f"{model}-base-s{k}")
                if run and base:
                    lines.append(f"| {model} | {what} | {k} | " + " | ".join(
                        f"{study.gap(run, base, 'loss', j):+.2f}%"
                        for j in range(len(base["heldout"]))) + " |")
    made = {}                                          # (stage 1, machine): the models made there
    for job, r in records.items():
        m = r["machine"]
        where = (r["data"].split("; stage 1 ")[-1], f"{m.get('cpu') or m['processor']}, "
                 f"{m['cpu_count']} cores, torch {m['torch']}, python {m['python']}")
        made.setdefault(where, []).append(job.rsplit("-", 2)[0])
    lines += ["", "Machines and latents (two runs at a time, one thread each, with other work on "
              "the same cores: train times are rough):", ""]
    lines += [f"- {', '.join(dict.fromkeys(models))}: {machine}; stage 1 {stage}"
              for (stage, machine), models in made.items()]
    lines += ["", "## Every run", "",
              "| job | held-out loss at each checkpoint | train time | steps above the clip | "
              "command |", "|---|---|---|---|---|"]
    for job, r in records.items():
        lines.append(f"| {job} | " + " ".join(f"{e['loss']:.4f}" for e in r["heldout"]) +
                     f" | {r['train_seconds']:.0f} s | {r['steps_above_clip']} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def charts(records):
    """results/depth_gap.png: the gap at the last step against depth, SRA 2 beside the control,
    per width; results/depth_steps.png: the gap against steps; the control in a lighter shade."""
    import demo_infra
    mean = lambda d: sum(d.values()) / len(d)
    series = []
    for i, width in enumerate(("64", "128")):
        for j, (what, variant) in enumerate((("SRA 2", "b"), ("control", "ctl"))):
            points = [(int(m.split("x")[0]), gaps(records, m, f"{variant}{blocks(m)[0]}"))
                      for m in MODELS if m.endswith("x" + width)]
            points = sorted((d, mean(g)) for d, g in points if g)
            if points:
                series.append((f"{what}, width {width}", *zip(*points), i, j == 1))
    for j, (what, variant) in enumerate((("SRA 2", "b"), ("control", "ctl"))):
        g = gaps(records, "24x64-taef2", f"{variant}{blocks('24x64')[0]}")    # a dot: one model
        if g:
            series.append((f"{what}, 24x64 on TAEF2's latents", [24], [mean(g)], 2 + j, False))
    if series:
        series.append((None, [0, 24], [0, 0], 7, True))
        demo_infra.line_chart(HERE / "depth_gap.png", series, "held-out loss gap against the "
                              "baseline at step 800 (%, below 0: better), mean of the seeds",
                              "SiT blocks (aligned at the paper's fraction of depth)", "gap (%)")
    series = []
    for i, model in enumerate(m for m in ROWS if f"{m}-base-s0" in records):
        paper = blocks(model)[0]
        for variant, what, thin in ((f"b{paper}", "SRA 2", False), (f"ctl{paper}", "control", True)):
            steps = [e["step"] for e in records[f"{model}-base-s0"]["heldout"]]
            curve = [gaps(records, model, variant, k) for k in range(len(steps))]
            if curve[0]:
                seeds = ("seeds " if len(curve[0]) > 1 else "seed ") + ", ".join(map(str, curve[0]))
                series.append((f"{model}, {what} ({seeds})", steps,
                               [mean(g) for g in curve], i, thin))
    if series:
        series.append((None, [0, 800], [0, 0], 7, True))
        demo_infra.line_chart(HERE / "depth_steps.png", series, "held-out loss gap against the "
                              "baseline (%, below 0: better), mean of the seeds; thin: the control",
                              "training steps", "gap (%)")
    long = "24x64-5k"
    series = []
    if f"{long}-base-s0" in records:
        steps = [e["step"] for e in records[f"{long}-base-s0"]["heldout"]]
        for i, (variant, what) in enumerate(trio(long)[1:]):
            curve = [gaps(records, long, variant, k) for k in range(len(steps))]
            curve = [g[0] for g in curve if 0 in g]
            if curve:
                series.append((what, steps[:len(curve)], curve, 0, i == 1))
    if series:
        series.append((None, [0, steps[-1]], [0, 0], 7, True))
        demo_infra.line_chart(HERE / "depth_long.png", series, "24x64, 5,000 steps, seed 0: "
                              "held-out loss gap against the baseline (%, below 0: better)",
                              "training steps", "gap (%)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("run", "table"))
    p.add_argument("jobs", nargs="*", help="jobs to run, e.g. 24x64-b8-s0 (default: the queue)")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per run (%(default)s)")
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: tiny_demo.py downloads)")
    p.add_argument("--work", default=str(HERE.parent / "demo_out" / "depth"),
                   help="where runs write (%(default)s)")
    a = p.parse_args(argv)
    if a.what == "run":
        done = load_records()                                  # recorded: not trained again
        study.run(a.jobs or [j for j in QUEUE if j not in done], a.lanes, a.data, a.work,
                  a.threads, command)
    else:
        records = collect(a.work)
        if not records:
            raise SystemExit(f"depth.py: no finished runs in {a.work} or {HERE / 'depth'}")
        mismatched = unpaired(records)
        if mismatched:
            raise SystemExit("depth.py: trained on other latents than their baselines (re-run "
                             "the baselines on this stage 1): " + ", ".join(mismatched))
        written = text(records)
        (HERE / "depth.md").write_text(written)
        charts(records)
        print(written, end="")


if __name__ == "__main__":
    main()
