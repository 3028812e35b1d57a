"""Tests for sra2.py, fid.py, tiny_demo.py and demo_infra.py: oracles (the same quantity computed
two ways) and invariants, fast on a CPU. Grouped as the files are: model, interpolant, alignment,
samplers, training, FID and Inception Score, the demo, bad input, CUDA, benchmark.

Run: python -m pytest -q                  (everything, as CI does)
     python -m pytest -q -m "not slow"    (without the end-to-end demo runs, the subprocess and
                                           torchrun runs and the real Inception network)"""
import argparse
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

import bench
import demo_infra
import fid
import sra2
import tiny_demo

HERE = Path(__file__).resolve().parent
# Oracle files that cannot be downloaded here: in the folder $SRA2_ORACLES names (side by side, or
# in reference/ and weights/ as CI keeps them in ../shared beside the checkout, the default).
SHARED = Path(os.environ.get("SRA2_ORACLES") or HERE.parent / "shared")


def oracle(sub, name):
    """SHARED/name, else SHARED/sub/name."""
    return SHARED / name if (SHARED / name).is_file() else SHARED / sub / name


OFFICIAL_KEYS = oracle("reference", "sit_state_dict_keys.txt")   # the released SiT's state dict
INCEPTION = oracle("weights", "pt_inception-2015-12-05-nofc.pth")             # FID Inception, no fc
INCEPTION_FP16 = oracle("weights", "pt_inception-2015-12-05-nofc-fp16.pth")
ORACLE = oracle("weights", "reference_features.npz")     # pytorch-fid / NVIDIA features of images
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
fast = settings(max_examples=20, deadline=None)


def needs_shared(*paths):
    """Skip the test unless these files are in SHARED, naming the missing ones."""
    missing = [path.name for path in paths if not path.is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} in the folder "
                              "SRA2_ORACLES=... names (README, Tests)")


# ---------------------------------------------------------------- shared helpers: the tiny SiT

def tiny_sit(**overrides):
    """A 4-block SiT on 8x8x4 latents with 10 classes: T = 16 tokens of width 64."""
    kw = dict(input_size=8, in_channels=4, num_classes=10, hidden_size=64, num_heads=4, depth=4,
              align_depth=2)
    return sra2.create_sit("SiT-S/2", **{**kw, **overrides})


def perturbed(model, scale=0.05, seed=0):
    """The official init zeroes every gate, so most gradients are 0: give all weights a random
    kick."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def batch(n=3, seed=0, c=4, size=8, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, size, size, generator=g), torch.rand(n, generator=g),
            torch.randint(0, num_classes, (n,), generator=g))


def gaussian_velocity(mu, s):
    """E[eps - z | x_t] for z ~ N(mu, s^2 I) on the linear path, x_t = (1 - t) z + t eps."""
    def v(x, t, y):
        t = t.reshape(-1, 1, 1, 1).to(x.dtype)
        var = (1 - t) ** 2 * s ** 2 + t ** 2                       # Var x_t
        # E v + Cov(v, x)/Var x (x - E x)
        return -mu + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * mu)
    return v


@pytest.fixture
def one_thread():
    """Small ops on a busy 2-core machine: one thread, or OpenMP's spin-waiting makes them 10x
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- shared helpers: fid.py

class _FidStandIn(torch.nn.Module):
    """A cheap stand-in for the Inception network: (N, 3, 299, 299) -> (N, 2048) features."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.nn.Parameter(torch.randn(3 * 4, 2048, generator=generator))
        self.fc, self.seen_precisions, self.seen_batch_sizes = None, [], []

    def forward(self, x):
        self.seen_precisions.append(_fid_tf32_flags())
        self.seen_batch_sizes.append(x.shape[0])
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)
        return pooled @ self.projection, None


def _fid_tf32_flags():
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return (torch.get_float32_matmul_precision(), b.cuda.matmul.fp32_precision,
                b.cudnn.conv.fp32_precision, b.mkldnn.conv.fp32_precision)
    return (torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)


def _fid_random_points(seed, d, n):
    """n Gaussian-ish points (n, d): their covariance is rank-deficient when n <= d."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * rng.uniform(0.1, 3)
    return x + rng.standard_normal(d)


def _fid_random_stats(seed, d, n):
    x = _fid_random_points(seed, d, n)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _fid_error_line(capsys, argv):
    """fid.main(argv) must exit with status 2 after exactly one line on stderr:
    'fid.py: error: ...'."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        fid.main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines()
             if not line.startswith("Inception features of ")]           # progress, not errors
    assert len(lines) == 1 and lines[0].startswith("fid.py: error: "), lines
    assert "convention" not in out, out  # nothing claims to have been saved or computed
    return lines[0].removeprefix("fid.py: error: ")


# ---------------------------------------------------------------- shared helpers: tiny_demo.py

# The smallest settings that still run every stage: 64 synthetic images, a width-8 VAE, the tiny
# SiT, 5 checkpoints with 3-image FIDs. Seconds on a CPU, numbers meaningless.
TINY = ["--quick", "--steps", "10", "--batch-size", "8", "--n-images", "64", "--vae-steps", "4",
        "--vae-batch", "8", "--vae-width", "8", "--evals", "5", "--fid-n", "3", "--final-fid-n",
        "3", "--fid-ref-n", "6", "--fid-sampling-steps", "2", "--final-sampling-steps", "3",
        "--log-every", "2", "--sample-batch", "8", "--device", "cpu"]


def error_line(capsys, argv):
    """Run main(argv), expect exit status 2, return the one line it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        tiny_demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def write_cifar_folder(root, n_per_batch=4, seed=0):
    """A fake cifar-10-batches-py folder in the official format (R, G, B planes of 32x32)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (5 * n_per_batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5 * n_per_batch)
    for k in range(5):
        part = slice(k * n_per_batch, (k + 1) * n_per_batch)
        rows = images[part].transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)
        with open(folder / f"data_batch_{k + 1}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels[part].tolist()}, f, protocol=2)
    # the test split
    test_images = rng.integers(0, 256, (3 * n_per_batch, 32, 32, 3), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": test_images.transpose(0, 3, 1, 2).reshape(-1, 3072),
                     b"labels": rng.integers(0, 10, len(test_images)).tolist()}, f, protocol=2)
    return folder, images, labels


# =============================================================================================
# Model: architecture, checkpoint names, init, and the official forward computed independently
# =============================================================================================


# Exact counts of the official SiT code at 32x32x4, 1000 classes, pos_embed included.
OFFICIAL_COUNTS = {"SiT-S/2": (32_957_200, 32_963_360), "SiT-B/2": (130_500_112, 130_512_416),
               "SiT-L/2": (458_086_416, 458_102_816), "SiT-XL/2": (675_111_184, 675_129_632)}


@pytest.mark.parametrize("name", OFFICIAL_COUNTS)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_parameter_counts_equal_official_sit(name, learn_sigma):
    with torch.device("meta"):                                     # shapes only, no memory
        model = sra2.create_sit(name, learn_sigma=learn_sigma)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name][learn_sigma]


def test_projector_sizes_match_paper():
    with torch.device("meta"):
        model = sra2.create_sit("SiT-B/2")
        count = lambda m: sum(p.numel() for p in m.parameters())
        assert count(sra2.make_projector(model)) == 8_288_272      # the paper's "8M"
        assert count(sra2.make_projector(model, depth=2)) == 1_205_776   # the paper's "1M"


def test_projector_default_is_five_linears_of_width_two_d():
    """The paper's P: 5 Linear layers, hidden width 2D, SiLU between, none after the last; the same
    default in Projector (used on other models) as in make_projector (D = 12 here)."""
    model = tiny_sit(hidden_size=12, num_heads=3)                  # out: p * p * C = 16
    for projector, out in ((sra2.Projector(12, 3), 3), (sra2.make_projector(model), 16)):
        layers = list(projector.mlp)
        linears = [(m.in_features, m.out_features) for m in layers[::2]]
        assert linears == [(12, 24), (24, 24), (24, 24), (24, 24), (24, out)]
        assert [type(m) for m in layers[1::2]] == [torch.nn.SiLU] * 4 and len(layers) == 9


def test_presets_cover_paper_names_and_align_depths():
    """The paper aligns block 2 of the 12-block S and B and block 8 of the 24-block L and the
    28-block XL, at every patch size; a bare SiTConfig is XL's (28 blocks, block 8)."""
    paper = {"S": (12, 384, 2), "B": (12, 768, 2), "L": (24, 1024, 8), "XL": (28, 1152, 8)}
    assert {f"SiT-{s}/{p}" for s in paper for p in (2, 4, 8)} == set(sra2.PRESETS)
    for name, preset in sra2.PRESETS.items():
        depth, width, align = paper[name[4:-2]]
        assert (preset["depth"], preset["hidden_size"], preset["align_depth"]) == (depth, width,
                                                                                   align), name
        with torch.device("meta"):
            assert sra2.create_sit(name).config.align_depth == align
    config = sra2.SiTConfig()
    assert (config.depth, config.hidden_size, config.align_depth) == (28, 1152, 8)


def official_keys():
    keys = {}
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line and not line.startswith(("#", "...")):
            name, shape = line.split("\t")
            shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
            names = ([name.replace("blocks.0.", f"blocks.{i}.") for i in range(12)]
                     if "blocks.0." in name else [name])
            keys.update({n: shape for n in names})
    return keys


@needs_shared(OFFICIAL_KEYS)
def test_state_dict_names_and_shapes_equal_official_sit():
    with torch.device("meta"):
        model = sra2.create_sit("SiT-B/2", learn_sigma=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys()
    assert model.pos_embed.requires_grad is False


def test_output_is_exactly_zero_at_init_and_first_loss_is_mean_eps_minus_z_squared():
    model = tiny_sit()
    z, t, y = batch()
    assert torch.equal(model(z, t, y), torch.zeros_like(z))
    eps = torch.randn_like(z)
    parts = sra2.training_loss(model, z, y, t=t, eps=eps)
    torch.testing.assert_close(parts["denoise"], ((eps - z) ** 2).mean())
    assert parts["align"].item() == 0


def numpy_pos_embed(dim, grid):
    """The official formula in numpy: 1-D [sin, cos] with omega_k = 1/10000^(k/(d'/2)), w first
    then h."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    h_index, w_index = np.divmod(np.arange(grid * grid), grid)     # row-major tokens
    return np.concatenate([one_d(dim // 2, w_index), one_d(dim // 2, h_index)], axis=1)


def test_pos_embed_equals_numpy_formula():
    model = tiny_sit(hidden_size=96, num_heads=4, input_size=12)
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), numpy_pos_embed(96, 6),
                               atol=1e-6)


def reference_forward(sd, cfg, x, t, y):
    """The official SiT written again as plain functions on the state dict (no modules shared)."""
    p, D, heads = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    N, C, H, W = x.shape
    x_tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    x_tok = x_tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    t_hidden = F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])
    t_emb = F.linear(F.silu(t_hidden), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda a: F.layer_norm(a, (D,), eps=1e-6)
    for i in range(cfg.depth):
        b = lambda n: sd[f"blocks.{i}.{n}"]
        mods = F.linear(F.silu(c), b("adaLN_modulation.1.weight"), b("adaLN_modulation.1.bias"))
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, None] for m in mods.chunk(6, 1)]
        a = ln(x_tok) * (1 + sc1) + sh1
        q, k, v = F.linear(a, b("attn.qkv.weight"), b("attn.qkv.bias")).chunk(3, -1)
        split = lambda u: u.reshape(N, -1, heads, D // heads).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
        att = torch.softmax(scores, -1) @ split(v)
        att = att.transpose(1, 2).reshape(N, -1, D)
        x_tok = x_tok + g1 * F.linear(att, b("attn.proj.weight"), b("attn.proj.bias"))
        m = ln(x_tok) * (1 + sc2) + sh2
        m = F.gelu(F.linear(m, b("mlp.fc1.weight"), b("mlp.fc1.bias")), approximate="tanh")
        m = F.linear(m, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        x_tok = x_tok + g2 * m
    sh, sc = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                      sd["final_layer.adaLN_modulation.1.bias"])[:, None].chunk(2, -1)
    out = F.linear(ln(x_tok) * (1 + sc) + sh, sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(N, H // p, W // p, p, p, c_out)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(N, c_out, H, W)
    return out[:, :C]                                              # learn_sigma: first C channels


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_forward_equals_independent_reference(learn_sigma, patch):
    model = perturbed(tiny_sit(learn_sigma=learn_sigma, patch_size=patch)).eval()
    z, t, y = batch()
    y[0] = 10                                                      # the null label is valid input
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(z, t, y), reference_forward(sd, model.config, z, t, y),
                               rtol=1e-4, atol=1e-5)


def test_label_dropout_only_in_training():
    model = tiny_sit(class_dropout_prob=0.5)
    y = torch.zeros(4000, dtype=torch.long)
    table = model.y_embedder.embedding_table.weight
    null_rows = lambda: (model.y_embedder(y) == table[10]).all(1).float().mean().item()
    assert abs(null_rows() - 0.5) < 5 * math.sqrt(0.25 / 4000)
    model.eval()
    assert null_rows() == 0


def test_label_dropout_default_is_the_papers_10_percent():
    """SiT, REPA and SRA 2 train with class_dropout_prob 0.1 (what makes CFG possible): a model
    built with no override nulls labels at that rate in training, within 5 binomial standard
    errors of 20,000 labels (0.2 would be 47 of them away)."""
    model, n = tiny_sit(), 20_000
    assert model.config.class_dropout_prob == sra2.SiTConfig().class_dropout_prob == 0.1
    with torch.device("meta"):
        assert all(sra2.create_sit(name).config.class_dropout_prob == 0.1 for name in sra2.PRESETS)
    torch.manual_seed(0)
    y = torch.zeros(n, dtype=torch.long)
    null = model.y_embedder.embedding_table.weight[10]
    rate = (model.y_embedder(y) == null).all(1).float().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)


@pytest.mark.usefixtures("one_thread")
def test_given_label_dropout_mask_is_the_dropout():
    """drop_labels replaces exactly the masked labels by the null label, in train and eval mode,
    and training_loss passes it through: the same loss as with those labels nulled by hand."""
    model, (x, t, y) = perturbed(tiny_sit()), batch(3)
    drop = torch.tensor([True, False, True])
    nulled = torch.where(drop, 10, y)
    assert torch.equal(model.eval()(x, t, y, drop_labels=drop), model(x, t, nulled))
    z, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    model.train()
    given = sra2.training_loss(model, z, y, t=t, eps=eps, drop_labels=drop)["loss"]
    assert torch.equal(given, sra2.training_loss(model.eval(), z, nulled, t=t, eps=eps)["loss"])


# ---------------------------------------------------------------- released checkpoints

def test_repa_checkpoint_loads_and_projectors_are_returned():
    source = perturbed(tiny_sit())
    state = {**source.state_dict(), "projectors.0.0.weight": torch.ones(3, 3)}
    target = tiny_sit()
    dropped = sra2.load_sit_checkpoint(target, {"model": state, "opt": {}})
    assert list(dropped) == ["projectors.0.0.weight"]
    z, t, y = batch()
    assert torch.equal(target.eval()(z, t, y), source.eval()(z, t, y))


def test_repa_training_file_with_args_loads_from_disk(tmp_path):
    source = perturbed(tiny_sit())
    path = tmp_path / "0400000.pt"                                 # REPA's train.py layout
    torch.save({"model": {}, "ema": source.state_dict(), "opt": {},
                "args": argparse.Namespace(lr=1e-4)}, path)
    target = tiny_sit()
    assert sra2.load_sit_checkpoint(target, path) == {}
    z, t, y = batch()
    assert torch.equal(target.eval()(z, t, y), source.eval()(z, t, y))


def test_meta_built_model_loads_into_the_same_function():
    source = perturbed(tiny_sit()).eval()
    with torch.device("meta"):                                     # how large models are built
        target = tiny_sit()
    target = target.to_empty(device="cpu").eval()
    target.load_state_dict(source.state_dict(), strict=True)
    z, t, y = batch()
    assert torch.equal(target(z, t, y), source(z, t, y))


def test_checkpoint_with_learn_sigma_mismatch_names_the_fix():
    state = tiny_sit(learn_sigma=True).state_dict()
    with pytest.raises(ValueError, match="learn_sigma=True"):
        sra2.load_sit_checkpoint(tiny_sit(), {"ema": state})


def test_time_flip_turns_sit_direction_into_ours():
    """The exact Gaussian velocity written in SiT's convention (tau = 1 data, u = z - eps), flipped,
    must equal the exact velocity written in ours (t = 0 data, v = eps - z)."""
    mu, s = 0.3, 0.8

    class SiTDirection(torch.nn.Module):                           # x = tau z + (1 - tau) eps
        config = tiny_sit().config

        def forward(self, x, tau, y):
            tau = tau[:, None, None, None]
            var = tau ** 2 * s ** 2 + (1 - tau) ** 2
            return mu + (tau * s ** 2 - (1 - tau)) / var * (x - tau * mu)

    z, t, y = batch()
    x = z.double()
    flipped = sra2.SiTTimeFlip(SiTDirection())(x, t.double(), y)
    torch.testing.assert_close(flipped, gaussian_velocity(mu, s)(x, t.double(), y))


# =============================================================================================
# Interpolant
# =============================================================================================


@fast
@given(path=st.sampled_from(sra2.PATHS), seed=st.integers(0, 2 ** 16))
def test_interpolant_endpoints(path, seed):
    z, _, _ = batch(seed=seed)
    eps = torch.randn_like(z)
    x0, _ = sra2.interpolate(z, eps, torch.zeros(3), path)
    x1, _ = sra2.interpolate(z, eps, torch.ones(3), path)
    torch.testing.assert_close(x0, z)                              # t = 0 is data
    torch.testing.assert_close(x1, eps, atol=1e-6, rtol=0)         # t = 1 is noise


@fast
@given(path=st.sampled_from(sra2.PATHS), t=st.floats(0.01, 0.99), seed=st.integers(0, 2 ** 16))
def test_velocity_target_equals_finite_difference(path, t, seed):
    z, _, _ = batch(seed=seed)
    z, eps = z.double(), torch.randn_like(z.double())
    h = 1e-6
    x_plus, _ = sra2.interpolate(z, eps, torch.full((3,), t + h, dtype=torch.float64), path)
    x_minus, _ = sra2.interpolate(z, eps, torch.full((3,), t - h, dtype=torch.float64), path)
    _, v = sra2.interpolate(z, eps, torch.full((3,), t, dtype=torch.float64), path)
    torch.testing.assert_close(v, (x_plus - x_minus) / (2 * h), rtol=1e-7, atol=1e-8)


def test_linear_velocity_target_is_eps_minus_z():
    z, t, _ = batch()
    eps = torch.randn_like(z)
    x_t, v = sra2.interpolate(z, eps, t)
    torch.testing.assert_close(v, eps - z)
    torch.testing.assert_close(x_t, (1 - t[:, None, None, None]) * z + t[:, None, None, None] * eps)


@fast
@given(path=st.sampled_from(sra2.PATHS), t=st.floats(0.02, 0.98), seed=st.integers(0, 2 ** 16))
def test_score_from_exact_velocity_is_minus_eps_over_sigma(path, t, seed):
    z, _, _ = batch(seed=seed)
    z, eps = z.double(), torch.randn_like(z.double())
    t_vec = torch.full((3,), t, dtype=torch.float64)
    x_t, v = sra2.interpolate(z, eps, t_vec, path)
    sigma = sra2.path_coefficients(t_vec, path)[1][:, None, None, None]
    torch.testing.assert_close(sra2.score_from_velocity(v, x_t, t_vec, path), -eps / sigma)
    if path == "linear":
        torch.testing.assert_close(sra2.score_from_velocity(v, x_t, t_vec), -eps / t)


# =============================================================================================
# Alignment: token layout, the tap, Alignment terms, losses
# =============================================================================================


# ---------------------------------------------------------------- token layout

@fast
@given(n=st.integers(1, 3), c=st.integers(1, 5), p=st.sampled_from([1, 2, 4]),
       h=st.integers(1, 3), w=st.integers(1, 3))
def test_patchify_and_unpatchify_are_inverses(n, c, p, h, w):
    x = torch.randn(n, c, h * p, w * p)
    tokens = sra2.patchify(x, p)
    assert tokens.shape == (n, h * w, p * p * c)
    assert torch.equal(sra2.unpatchify(tokens, p, h * p, w * p), x)


def test_patch_vectors_are_in_p_q_c_order():
    x = torch.randn(2, 3, 4, 6)
    tokens = sra2.patchify(x, 2)
    for i, j, a, b, c in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (0, 1, 0, 1, 1), (1, 1, 1, 1, 0)]:
        # token (i, j) = row-major index i * (W / p) + j; element (a, b, c) at (a * p + b) * C + c
        assert tokens[1, i * 3 + j, (a * 2 + b) * 3 + c] == x[1, c, i * 2 + a, j * 2 + b]


# ---------------------------------------------------------------- the tap on block k

def manual_forward(model, x_t, t, y, k):
    """sra2's SiT by hand, module by module: v and h after block k (what the tap must capture)."""
    x = model.x_embedder(x_t) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    h = None
    for depth, block in enumerate(model.blocks, start=1):
        x = block(x, c)
        h = x if depth == k else h
    return sra2.unpatchify(model.final_layer(x, c), 2, *x_t.shape[2:])[:, :4], h


def test_tap_gives_the_loss_and_gradients_of_a_hand_written_forward():
    model = perturbed(tiny_sit()).eval()                           # eval: no random label dropout
    projector = perturbed(sra2.make_projector(model), seed=1)
    z, t, y = batch()
    eps = torch.randn_like(z)
    parts = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    parts["loss"].backward()
    params = [*model.parameters(), *projector.parameters()]
    grads = [p.grad.clone() for p in params if p.grad is not None]
    model.zero_grad(), projector.zero_grad()
    x_t, v_target = sra2.interpolate(z, eps, t)
    v, h = manual_forward(model, x_t, t, y, k=2)
    align = sra2.alignment_loss(projector(h), sra2.patchify(z, 2)).mean()
    loss = (v - v_target).square().mean() + align
    loss.backward()
    again = [p.grad for p in params if p.grad is not None]
    assert parts["loss"].item() == loss.item() and parts["align"].item() == align.item()
    assert len(grads) == len(again) and all(torch.equal(a, b) for a, b in zip(grads, again))
    assert all(not b._forward_hooks for b in model.blocks)         # nothing left registered


def test_tap_under_bf16_autocast_and_data_parallel(tmp_path):
    """The same loss under bf16 autocast (within bf16 rounding) and through a one-process
    DistributedDataParallel wrapper (exactly), with no hook left behind."""
    model = perturbed(tiny_sit()).eval()
    projector = sra2.make_projector(model)
    z, t, y = batch()
    eps = torch.randn_like(z)
    plain = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    with sra2.autocast("cpu"):
        low = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    for key in ("denoise", "align"):
        assert abs(low[key].item() - plain[key].item()) <= 2e-2 * plain[key].item()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    try:
        wrapped = sra2.training_loss(DistributedDataParallel(model), z, y, projector, t=t, eps=eps)
    finally:
        torch.distributed.destroy_process_group()
    assert wrapped["loss"].item() == plain["loss"].item()
    assert all(not b._forward_hooks for b in model.blocks)


def test_tap_is_removed_when_the_forward_raises_and_bad_taps_are_clear_errors():
    model = tiny_sit()
    z, t, y = batch()
    with pytest.raises(ValueError, match="labels must be in"):
        sra2.training_loss(model, z, y + 100, sra2.make_projector(model), t=t)
    assert all(not b._forward_hooks for b in model.blocks)
    with pytest.raises(ValueError, match="align depth 5 is outside the model's blocks 1..4"):
        with sra2.tap(model, [2, 5]):
            pass
    assert all(not b._forward_hooks for b in model.blocks)
    with pytest.raises(ValueError, match="Linear has no `blocks` ModuleList"):
        with sra2.tap(torch.nn.Linear(2, 2), [1]):
            pass
    P = sra2.make_projector(model)
    with pytest.raises(ValueError, match="names must be distinct"):
        sra2.training_loss(model, z, y, P, alignments=[sra2.Alignment("align", 1, P)], t=t)
    with pytest.raises(ValueError, match="projector output .* and target .* differ"):
        repa = sra2.Alignment("repa", 3, P, target=torch.randn(3, 16, 7))
        sra2.training_loss(model, z, y, alignments=[repa], t=t)
    assert all(not b._forward_hooks for b in model.blocks)


# ---------------------------------------------------------------- Alignment terms, README examples

class DiTShaped(torch.nn.Module):
    """A model in the shape of DiT/SiT/REPA's code, not sra2's SiT: patch_size, blocks,
    forward(x, t, y).
    Its own small blocks (MLP tokens, additive conditioning); enough for a tap and an alignment."""

    def __init__(self, D=32, p=2, C=4, size=8, depth=4, num_classes=10):
        super().__init__()
        self.patch_size, self.in_channels = p, C
        self.x_embedder = torch.nn.Conv2d(C, D, p, stride=p)
        self.pos_embed = torch.nn.Parameter(0.1 * torch.randn(1, (size // p) ** 2, D))
        self.t_embedder = torch.nn.Linear(1, D)
        self.y_embedder = torch.nn.Embedding(num_classes + 1, D)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(D), torch.nn.Linear(D, D), torch.nn.GELU())
            for _ in range(depth))
        self.final_layer = torch.nn.Linear(D, p * p * C)

    def forward(self, x, t, y):
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed         # (N, T, D)
        c = (self.t_embedder(t[:, None]) + self.y_embedder(y))[:, None]             # (N, 1, D)
        for block in self.blocks:
            h = h + block(h + c)
        return sra2.unpatchify(self.final_layer(h), self.patch_size, *x.shape[2:])


def readme_snippets(section):
    """The python blocks of one README section, in order."""
    text = (HERE / "README.md").read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


class SiTStyleTransport:
    """SiT's training loss in SiT's own time direction (tau = 1 data, target u = z - eps), as its
    transport.training_losses computes it: the README snippet must not care about the direction."""

    def training_losses(self, model, x1, model_kwargs):
        tau = torch.rand(x1.shape[0])
        x0 = torch.randn_like(x1)
        x_tau = tau[:, None, None, None] * x1 + (1 - tau[:, None, None, None]) * x0
        u = model(x_tau, tau, **model_kwargs)
        return {"loss": (u - (x1 - x0)).square().mean((1, 2, 3))}


def test_sra2_and_repa_terms_together_on_a_dit_shaped_model():
    """Two alignment terms in one step on a model that is not sra2's SiT: each term equals its
    hand-computed value from h after its own block, and loss = denoise + sum of weight x term."""
    torch.manual_seed(0)
    model = DiTShaped()
    z, t, y = batch()
    eps, dino = torch.randn_like(z), torch.randn(3, 16, 24)        # (N, T, d) external features
    P_sra, P_repa = sra2.Projector(32, 16), sra2.Projector(32, 24, depth=3)
    terms = [sra2.Alignment("sra2", 2, P_sra),
             sra2.Alignment("repa", 3, P_repa, dino, "cosine", 0.5)]
    parts = sra2.training_loss(model, z, y, alignments=terms, t=t, eps=eps)
    hidden = {}
    handles = [model.blocks[k - 1].register_forward_hook(
        lambda m, a, out, k=k: hidden.__setitem__(k, out)) for k in (2, 3)]
    x_t, v_target = sra2.interpolate(z, eps, t)
    denoise = (model(x_t, t, y) - v_target).square().mean()
    [h.remove() for h in handles]
    sra_term = sra2.alignment_loss(P_sra(hidden[2]), sra2.patchify(z, 2)).mean()
    repa_term = (1 - torch.nn.functional.cosine_similarity(P_repa(hidden[3]), dino, dim=-1)).mean()
    torch.testing.assert_close(parts["sra2"], sra_term)
    torch.testing.assert_close(parts["repa"], repa_term)
    torch.testing.assert_close(parts["loss"], denoise + sra_term + 0.5 * repa_term)
    assert set(parts) == {"loss", "denoise", "align", "sra2", "repa"} and parts["align"] == 0
    with pytest.raises(ValueError, match="align_depth is needed"):
        # no config: the block must be named
        sra2.training_loss(model, z, y, P_sra, t=t)
    assert torch.isfinite(sra2.training_loss(model, z, y, P_sra, align_depth=1, t=t)["align"])


def test_a_model_returning_v_and_extras_trains_like_one_returning_v():
    """REPA's SiT returns (v, zs): training_loss takes v, the tuple's first item."""
    class WithExtras(DiTShaped):
        def forward(self, x, t, y):
            return super().forward(x, t, y), [torch.zeros(1)]               # (v, zs)
    torch.manual_seed(0)
    plain, extras = DiTShaped(), WithExtras()
    extras.load_state_dict(plain.state_dict())
    z, t, y = batch()
    eps, projector = torch.randn_like(z), sra2.Projector(32, 16)
    a, b = (sra2.training_loss(m, z, y, projector, align_depth=2, t=t, eps=eps)
            for m in (plain, extras))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_readme_snippets_run_on_a_dit_shaped_model():
    """Both snippets of "Add SRA 2 to your training script", run as written on a model that is
    not sra2's SiT: the loss holds the alignment term, P gets gradients, no hook stays behind, and
    with REPA next to it the loss is denoise + sra2 + 0.5 repa."""
    first, second = readme_snippets("Add SRA 2 to your training script")
    torch.manual_seed(0)
    model = DiTShaped()
    x, _, y = batch()
    scope = dict(torch=torch, model=model, x=x, y=y, transport=SiTStyleTransport(), hidden_size=32,
                 patch_size=2, latent_channels=4, device="cpu")
    exec(first, scope)
    assert scope["loss"].item() == pytest.approx(
        scope["loss_dict"]["loss"].mean().item() + scope["align"].item())
    assert scope["align"] > 0 and all(p.grad is not None for p in scope["projector"].parameters())
    assert all(not b._forward_hooks for b in model.blocks)
    scope.update(repa_projector=sra2.Projector(32, 24), dino_tokens=torch.randn(3, 16, 24),
                 model=DiTShaped(depth=8))
    exec(second, scope)
    parts = scope["parts"]
    torch.testing.assert_close(parts["loss"],
                               parts["denoise"] + parts["sra2"] + 0.5 * parts["repa"])
    assert parts["sra2"] > 0 and parts["repa"] > 0


def test_readme_ten_lines_run_in_seconds_and_save_a_plain_sit(tmp_path, monkeypatch):
    """The README's first example as written: a training step, a sample, and a state dict that
    holds the SiT only (no projector keys), loadable into a fresh model of the same shape."""
    (code,) = readme_snippets("Ten lines on random tensors (seconds on a laptop CPU)")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["x0"].shape == (4, 4, 16, 16) and torch.isfinite(scope["x0"]).all()
    state = torch.load(tmp_path / "sit.pt", weights_only=True)
    assert not any(k.startswith("mlp") for k in state)
    assert set(state) == set(scope["model"].state_dict())
    assert (tmp_path / "sit.pt").stat().st_size < 10 * 2 ** 20


# ---------------------------------------------------------------- losses

@fast
@given(d=st.floats(-3, 3), beta=st.floats(0.01, 1.0))
def test_smooth_l1_equals_reference_formula(d, beta):
    f_sit = torch.tensor([[[d]]], dtype=torch.float64)
    f_vae = torch.zeros(1, 1, 1, dtype=torch.float64)
    expected = 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta
    assert math.isclose(sra2.alignment_loss(f_sit, f_vae, beta=beta).item(), expected,
                        rel_tol=1e-9, abs_tol=1e-12)


def test_smooth_l1_is_quadratic_below_beta_and_linear_above():
    loss = lambda d: sra2.alignment_loss(torch.full((1, 1, 1), d), torch.zeros(1, 1, 1)).item()
    assert math.isclose(loss(0.02), 4 * loss(0.01), rel_tol=1e-5)  # quadratic: doubling d gives 4x
    # linear slope 1
    assert math.isclose(loss(0.4) - loss(0.2), loss(0.6) - loss(0.4), rel_tol=1e-5)
    assert math.isclose(loss(0.4) - loss(0.2), 0.2, rel_tol=1e-5)


def test_smooth_l1_default_beta_is_the_papers_0_05():
    """SRA 2 uses smooth-L1 with beta 0.05: alignment_loss (and so training_loss, which passes no
    beta) gives 0.5 d^2 / 0.05 below |d| = 0.05 and |d| - 0.025 above, by hand."""
    loss = lambda d: sra2.alignment_loss(torch.full((1, 1, 1), d, dtype=torch.float64),
                                         torch.zeros(1, 1, 1, dtype=torch.float64)).item()
    for d, expected in [(0.01, 0.001), (-0.04, 0.016), (0.06, 0.035), (0.5, 0.475)]:
        assert math.isclose(loss(d), expected, rel_tol=1e-12), d


@pytest.mark.parametrize("kind,formula", [
    ("l1", lambda a, b: (a - b).abs().mean((1, 2))),
    ("l2", lambda a, b: ((a - b) ** 2).mean((1, 2))),
    ("cosine", lambda a, b: 1 - ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean(1)),
])
def test_other_alignment_losses_equal_their_formulas(kind, formula):
    a, b = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.testing.assert_close(sra2.alignment_loss(a, b, kind), formula(a, b))


def test_loss_is_denoise_plus_lambda_align():
    model = perturbed(tiny_sit()).eval()                           # eval: no random label dropout
    projector = sra2.make_projector(model)
    z, t, y = batch()
    eps = torch.randn_like(z)
    parts = sra2.training_loss(model, z, y, projector, lam=0.1, t=t, eps=eps)
    torch.testing.assert_close(parts["loss"], parts["denoise"] + 0.1 * parts["align"])
    plain = sra2.training_loss(model, z, y, t=t, eps=eps)
    torch.testing.assert_close(plain["denoise"], parts["denoise"])  # same forward pass, same t


class Recorder(torch.nn.Module):
    """model(x_t, t, y) -> 0 that keeps what it was given."""

    def forward(self, x_t, t, y):
        self.x_t, self.t = x_t, t
        return torch.zeros_like(x_t)


def test_default_draws_are_uniform_t_and_gaussian_eps_and_lambda_is_one():
    """What training_loss draws when t and eps are not given: t ~ U[0, 1] and eps ~ N(0, I), seen
    by the model through x_t = t eps (z = 0), each moment within 5 standard errors of 20,000
    draws; and the paper's lambda = 1: loss = denoise + align when lam is not given."""
    n, model = 20_000, Recorder()
    torch.manual_seed(0)
    z = torch.zeros(n, 1, 1, 1, dtype=torch.float64)
    denoise = sra2.training_loss(model, z, torch.zeros(n, dtype=torch.long))["denoise"].item()
    t, eps = model.t, (model.x_t / model.t[:, None, None, None]).flatten()
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(t.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)   # Var (t - 1/2)^2 = 1/180
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert math.isclose(denoise, eps.square().mean().item(), rel_tol=1e-6)   # |0 - (eps - 0)|^2
    sit = perturbed(tiny_sit()).eval()
    z, t, y = batch()
    parts = sra2.training_loss(sit, z, y, sra2.make_projector(sit), t=t)
    assert parts["align"] > 0 and parts["loss"].item() == (parts["denoise"] + parts["align"]).item()


def test_sra2_target_is_the_clean_latent_as_tokens():
    """A projector that outputs patchify(z) exactly gives align = 0; shifting z by 0.5 gives the
    smooth-L1 value of a 0.5 error everywhere, so the target is z in the model's token layout."""
    model = tiny_sit()
    z, t, y = batch()

    class Oracle(torch.nn.Module):
        def forward(self, h):
            return sra2.patchify(z, 2) + 0 * h.sum()

    assert sra2.training_loss(model, z, y, Oracle(), t=t)["align"].item() == 0
    shifted = sra2.training_loss(model, z + 0.5, y, Oracle(), t=t)["align"].item()
    assert math.isclose(shifted, 0.5 - 0.025, rel_tol=1e-5)       # |d| = 0.5 > beta: 0.5 - beta / 2


def test_generic_target_features_of_any_width():
    model = perturbed(tiny_sit())
    projector = sra2.Projector(64, 12, depth=3)
    z, t, y = batch()
    target = torch.randn(3, 16, 12)                                # e.g. DINOv2 tokens, (N, T, d)
    eps = torch.randn_like(z)
    parts = sra2.training_loss(model.eval(), z, y, projector, target=target, t=t, eps=eps)
    parts["loss"].backward()
    _, h = manual_forward(model, sra2.interpolate(z, eps, t)[0], t, y, k=2)
    expected = sra2.alignment_loss(projector(h), target).mean()    # P(h_2) against the target
    assert parts["align"].item() == expected.item() > 0
    assert projector.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="differ"):
        sra2.training_loss(model, z, y, projector, target=torch.randn(3, 16, 5), t=t)


def test_t_range_limits_alignment_to_samples_inside_it():
    model = perturbed(tiny_sit()).eval()                           # eval: no random label dropout
    projector = sra2.make_projector(model)
    z, _, y = batch(n=4)
    t, eps = torch.tensor([0.1, 0.3, 0.7, 0.9]), torch.randn_like(z)
    align = lambda z_target: sra2.training_loss(model, z, y, projector, t=t, eps=eps,
                                                t_range=(0.0, 0.5),
                                                target=sra2.patchify(z_target, 2))["align"].item()
    outside, inside = z.clone(), z.clone()
    outside[2:] += 1.0                                             # change targets of t = 0.7, 0.9
    inside[:2] += 1.0                                              # change targets of t = 0.1, 0.3
    assert align(outside) == align(z)
    assert align(inside) != align(z)


def test_t_range_term_is_the_mean_over_the_samples_inside_it():
    """A projector that outputs z's tokens, a target of sample i shifted by d_i > beta: sample i's
    term is d_i - 0.025, and a t_range term is the mean over the samples with t in [lo, hi] (ends
    included), by hand; with none inside, it is 0."""
    model = tiny_sit().eval()
    z, _, y = batch(n=4)
    t, d = torch.tensor([0.1, 0.5, 0.7, 0.9]), torch.tensor([0.2, 0.4, 0.6, 0.8])

    class Oracle(torch.nn.Module):
        def forward(self, h):
            return sra2.patchify(z, 2) + 0 * h.sum()

    target = sra2.patchify(z + d[:, None, None, None], 2)
    align = lambda lo, hi: sra2.training_loss(model, z, y, Oracle(), t=t, t_range=(lo, hi),
                                              target=target)["align"].item()
    per_sample = [0.175, 0.375, 0.575, 0.775]                      # d - beta / 2
    for (lo, hi), inside in [((0.0, 0.5), [0, 1]), ((0.5, 1.0), [1, 2, 3]), ((0.7, 0.7), [2]),
                             ((0.0, 1.0), [0, 1, 2, 3]), ((0.2, 0.4), [])]:
        expected = sum(per_sample[i] for i in inside) / max(len(inside), 1)
        assert math.isclose(align(lo, hi), expected, rel_tol=1e-5, abs_tol=1e-7), (lo, hi)


def test_alignment_gradient_reaches_projector_and_blocks_up_to_depth_only():
    model = perturbed(tiny_sit(depth=4))
    projector = sra2.make_projector(model)
    z, t, y = batch()
    sra2.training_loss(model, z, y, projector, align_depth=2, t=t)["align"].backward()
    grad = lambda m: sum(p.grad.abs().sum().item() for p in m.parameters() if p.grad is not None)
    assert grad(projector) > 0
    assert grad(model.blocks[0]) > 0 and grad(model.blocks[1]) > 0
    assert all(p.grad is None for p in model.blocks[2:].parameters())
    assert all(p.grad is None for p in model.final_layer.parameters())


# =============================================================================================
# Samplers
# =============================================================================================


class CountingModel(torch.nn.Module):
    """Wraps a SiT and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t[0].item()))
        return self.model(x, t, y)


@pytest.mark.parametrize("sampler", [
    lambda v, x, y, g: sra2.sample_sde(v, x, y, num_steps=100, generator=g, t_last=0.01),
    lambda v, x, y, g: sra2.sample_ode(v, x, y, num_steps=250, method="euler"),
    lambda v, x, y, g: sra2.sample_ode(v, x, y, num_steps=50, method="heun"),
], ids=["sde", "euler", "heun"])
def test_samplers_recover_a_gaussian(sampler):
    """Mean and variance within 5 standard errors of n = 80,000 i.i.d. values (plus nothing else:
    the step counts are chosen so the discretisation bias is below one standard error)."""
    mu, s, n = 0.7, 0.5, 20000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    x = sampler(gaussian_velocity(mu, s), noise, torch.zeros(n, dtype=torch.long), g)
    m = x.numel()
    assert abs(x.mean().item() - mu) < 5 * s / math.sqrt(m)
    assert abs(x.var().item() - s ** 2) < 5 * s ** 2 * math.sqrt(2 / m)


def test_sde_with_papers_grid_matches_its_exact_discrete_moments():
    """With the Gaussian's velocity v = a(t) + b(t) x, each Euler-Maruyama step is affine plus
    noise, so the exact mean and variance of the paper's sampler (here on a 25-step grid of the
    same shape: 1 -> 0.04, then 0) follow a recursion:
    x <- k x + (2 - t) a dt (+ sqrt(2 t |dt|) xi), k = 1 + ((2 - t) b + 1) dt (linear path,
    drift v - t s = (2 - t) v + x). The sampler must match it within 5 standard errors; its
    variance ends about 2% below the data's (the noise-free last step from t = 0.04)."""
    mu, s, n = 0.7, 0.5, 100_000                                  # 400k values: 1 SE = 0.22%
    times = torch.linspace(1.0, 0.04, 25, dtype=torch.float64).tolist() + [0.0]
    mean, var = 0.0, 1.0
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt, var_t = t_next - t, (1 - t) ** 2 * s ** 2 + t ** 2
        b = (t - (1 - t) * s ** 2) / var_t                         # v = a + b x
        a = -mu - b * (1 - t) * mu
        k = 1 + ((2 - t) * b + 1) * dt
        mean, var = k * mean + (2 - t) * a * dt, k * k * var + (2 * t * -dt if i < 24 else 0.0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    x = sra2.sample_sde(gaussian_velocity(mu, s), noise, torch.zeros(n, dtype=torch.long),
                        num_steps=25, generator=g)
    m = x.numel()
    assert abs(var / s ** 2 - 1) > 8 * math.sqrt(2 / m)            # s^2 itself would fail below
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / m)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / m)


def test_sde_equals_float64_step_by_step_reference():
    """The Euler-Maruyama sampler written out by hand on a 4-step grid, with the same noise
    draws."""
    model = perturbed(tiny_sit()).eval()
    noise, _, y = batch(n=2, seed=3)
    times = [1.0, 0.68, 0.36, 0.04, 0.0]                           # linspace(1, 0.04, 4) then 0
    g = torch.Generator().manual_seed(7)
    x = noise.double()
    for i in range(4):
        t, dt = times[i], times[i + 1] - times[i]
        v = model(x.float(), torch.full((2,), t), y).double()
        s = -((1 - t) * v + x) / t
        x = x + (v - t * s) * dt
        if i < 3:
            xi = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + math.sqrt(2 * t) * math.sqrt(-dt) * xi
    out = sra2.sample_sde(model, noise, y, num_steps=4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, x.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32])
def test_guided_sde_state_is_float64_end_to_end(model_dtype):
    """Guided (w = 2.5, inside t <= 0.7 only) Euler-Maruyama against a float64 reference written
    out by hand, with the same model calls (one doubled batch when guided) and noise draws: equal
    to 1e-12, so t, sigma_t and the guidance mix are never rounded to the model's precision."""
    model = perturbed(tiny_sit()).to(model_dtype).eval()
    noise, _, y = batch(n=2, seed=3)
    noise = noise.to(model_dtype)
    times = torch.linspace(1.0, 0.04, 5, dtype=torch.float64).tolist() + [0.0]
    g = torch.Generator().manual_seed(7)
    x, null = noise.double(), torch.full_like(y, 10)
    for i in range(5):
        t, dt = times[i], times[i + 1] - times[i]
        t_vec = torch.full((2,), t, dtype=model_dtype)
        if t <= 0.7:
            v_c, v_u = model(torch.cat([x, x]).to(model_dtype), torch.cat([t_vec, t_vec]),
                             torch.cat([y, null])).double().chunk(2)
            v = v_u + 2.5 * (v_c - v_u)
        else:
            v = model(x.to(model_dtype), t_vec, y).double()
        s = -((1 - t) * v + x) / t
        x = x + (v - t * s) * dt
        if i < 4:
            xi = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + math.sqrt(2 * t) * math.sqrt(-dt) * xi
    out = sra2.sample_sde(model, noise, y, num_steps=5, cfg_scale=2.5, guidance_interval=(0.0, 0.7),
                          generator=torch.Generator().manual_seed(7))
    if model_dtype == torch.float64:
        assert (out - x).abs().max().item() <= 1e-12
    else:                                        # the state is float64; only the output is rounded
        assert torch.equal(out, x.to(model_dtype))


def test_samplers_are_reproducible_with_a_generator():
    model = perturbed(tiny_sit()).eval()
    noise, _, y = batch(n=2)
    run = lambda seed: sra2.sample_sde(model, noise, y, num_steps=5,
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_cfg_scale_one_is_the_conditional_output_in_one_pass():
    model = CountingModel(perturbed(tiny_sit()).eval())
    x, _, y = batch()
    v = sra2.guided_velocity(model, x, 0.5, y, cfg_scale=1.0)
    torch.testing.assert_close(v, model.model(x, torch.full((3,), 0.5), y))
    assert model.calls == [(3, 0.5)]


def test_cfg_scale_below_one_interpolates_and_negative_is_an_error():
    model = CountingModel(perturbed(tiny_sit()).eval())
    x, _, y = batch()
    t_vec = torch.full((3,), 0.5)
    v_c, v_u = model.model(x, t_vec, y), model.model(x, t_vec, torch.full_like(y, 10))
    # unconditional
    torch.testing.assert_close(sra2.guided_velocity(model, x, 0.5, y, cfg_scale=0.0), v_u)
    torch.testing.assert_close(sra2.guided_velocity(model, x, 0.5, y, cfg_scale=0.5),
                               (v_u + v_c) / 2)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        sra2.sample_sde(model, x, y, num_steps=2, cfg_scale=-1.0)


def test_cfg_guides_all_channels_and_only_inside_the_interval():
    model = CountingModel(perturbed(tiny_sit()).eval())
    x, _, y = batch()
    t_vec = torch.full((3,), 0.5)
    v = sra2.guided_velocity(model, x, 0.5, y, cfg_scale=4.0)
    v_c, v_u = model.model(x, t_vec, y), model.model(x, t_vec, torch.full_like(y, 10))
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)   # all 4 channels
    assert model.calls == [(6, 0.5)]                               # one doubled batch
    model.calls.clear()
    sra2.sample_ode(model, x, y, num_steps=4, method="euler", cfg_scale=4.0,
                    guidance_interval=(0.0, 0.7))
    # 1, 0.75 outside the interval
    assert model.calls == [(3, 1.0), (3, 0.75), (6, 0.5), (6, 0.25)]


def test_guidance_interval_includes_both_ends():
    """CFG for t in [low, high], both ends included: the scale at each end exactly, 1 (no
    guidance) just outside; in the sampler, steps landing on an end are guided (doubled batch)."""
    for low, high in [(0.25, 0.75), (0.0, 0.7), (0.3, 1.0)]:
        assert sra2.guidance_scale(low, 4.0, (low, high)) == 4.0
        assert sra2.guidance_scale(high, 4.0, (low, high)) == 4.0
        assert sra2.guidance_scale(math.nextafter(high, 2), 4.0, (low, high)) == 1.0
        assert sra2.guidance_scale(math.nextafter(low, -1), 4.0, (low, high)) == 1.0
    model = CountingModel(perturbed(tiny_sit()).eval())
    x, _, y = batch()
    sra2.sample_ode(model, x, y, num_steps=4, method="euler", cfg_scale=4.0,
                    guidance_interval=(0.25, 0.75))
    assert model.calls == [(3, 1.0), (6, 0.75), (6, 0.5), (6, 0.25)]


def test_sampler_call_counts():
    model = CountingModel(perturbed(tiny_sit()).eval())
    x, _, y = batch()
    sra2.sample_sde(model, x, y, num_steps=7)
    assert len(model.calls) == 7 and model.calls[-1][1] == pytest.approx(0.04)
    model.calls.clear()
    sra2.sample_ode(model, x, y, num_steps=5, method="heun")
    assert len(model.calls) == 9                                   # 2N - 1


def test_sde_default_is_the_papers_250_steps_from_1_to_0_04_then_a_noise_free_step():
    """The papers' sampler: 250 Euler-Maruyama steps at t = linspace(1, 0.04, 250), then a last
    step to 0 with the mean only, so the generator gives exactly 249 noise draws."""
    times, shape = [], (1, 1, 1, 1)
    model = lambda x, t, y: (times.append(t.item()), torch.zeros_like(x))[1]
    g = torch.Generator().manual_seed(5)
    sra2.sample_sde(model, torch.ones(shape), torch.zeros(1, dtype=torch.long), generator=g)
    np.testing.assert_allclose(times, np.linspace(1, 0.04, 250), rtol=0, atol=1e-7)
    again = torch.Generator().manual_seed(5)
    for _ in range(249):
        torch.randn(shape, generator=again, dtype=torch.float64)
    assert torch.randn(1, generator=g).item() == torch.randn(1, generator=again).item()


# =============================================================================================
# Training: precision, optimisation, EMA, checkpoints
# =============================================================================================


def test_bf16_autocast_is_close_to_fp32_and_finite():
    model = perturbed(tiny_sit(), scale=0.1).eval()
    projector = sra2.make_projector(model)
    z, t, y = batch(n=4)
    eps = torch.randn_like(z)
    exact = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    with sra2.autocast("cpu"):
        v = model(z, t, y)
        low = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    v32 = model(z, t, y)
    # bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 0.2%); a few layers accumulate a few of
    # those.
    assert (v.float() - v32).norm() / v32.norm() < 2e-2
    for key in ("denoise", "align", "loss"):
        assert low[key].dtype == torch.float32 and torch.isfinite(low[key])
        assert abs(low[key].item() - exact[key].item()) < 2e-2 * abs(exact[key].item())


def test_pick_device_and_autocast(monkeypatch):
    """cuda, then mps, then cpu, whatever this machine has (availability is faked); a named device
    is used if available, and a missing one is an error."""
    assert sra2.pick_device("cpu") == torch.device("cpu")
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert sra2.pick_device() == torch.device(expected)
    for name in ("cuda", "mps"):                                   # both faked absent now
        with pytest.raises(ValueError, match=f"{name.upper()} is not available"):
            sra2.pick_device(name)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert sra2.pick_device("mps:0") == torch.device("mps:0")
    assert isinstance(sra2.autocast("cpu"), torch.autocast)
    assert not isinstance(sra2.autocast("cpu", enabled=False), torch.autocast)


@pytest.mark.slow
def test_a_few_steps_overfit_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_sit(class_dropout_prob=0.0, depth=2, align_depth=1)
    projector = sra2.make_projector(model, depth=2)
    z, t, y = batch(n=4)
    eps = torch.randn_like(z)
    opt = torch.optim.AdamW(list(model.parameters()) + list(projector.parameters()), lr=2e-3)
    losses = []
    for _ in range(60):
        parts = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append((parts["denoise"].item(), parts["align"].item()))
    assert losses[-1][0] < 0.1 * losses[0][0] and losses[-1][1] < 0.1 * losses[0][1]


def test_ema_starts_as_copy_and_follows_the_formula():
    model = perturbed(tiny_sit())
    ema = sra2.create_ema(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    assert not any(p.requires_grad for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    perturbed(model, seed=1)
    sra2.update_ema(ema, model, decay=0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_ema_default_decay_is_the_papers_0_9999():
    """SiT and REPA report the EMA with decay 0.9999: with no decay given, an EMA at 0 that follows
    a model at 1 is at 1 - 0.9999^k after k updates (0.999 would give ten times that)."""
    ema, model = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    torch.nn.init.zeros_(ema.weight), torch.nn.init.zeros_(ema.bias)
    torch.nn.init.ones_(model.weight), torch.nn.init.ones_(model.bias)
    for k in (1, 2, 3):
        sra2.update_ema(ema, model)
        for p in ema.parameters():
            torch.testing.assert_close(p, torch.full_like(p, 1 - 0.9999 ** k), rtol=1e-9, atol=0)


def test_dropping_projector_leaves_a_plain_sit():
    model = tiny_sit()
    projector = sra2.make_projector(model)
    opt = torch.optim.AdamW(list(model.parameters()) + list(projector.parameters()), lr=1e-3)
    for seed in range(2):
        z, _, y = batch(seed=seed)
        opt.zero_grad()
        sra2.training_loss(model, z, y, projector)["loss"].backward()
        opt.step()
    fresh = tiny_sit()
    fresh.load_state_dict(model.state_dict(), strict=True)         # the SiT's keys, no more
    z, t, y = batch(seed=5)
    assert torch.equal(fresh.eval()(z, t, y), model.eval()(z, t, y))
    assert model.eval()(z, t, y).abs().sum() > 0                   # trained: not the zero init


# =============================================================================================
# FID and Inception Score (fid.py): closed forms and the sqrtm reference for the Frechet distance,
# exact facts for the Inception Score, oracle features from the real pytorch-fid / NVIDIA pipelines
# =============================================================================================


@functools.lru_cache(maxsize=None)
def _fid_model():
    return fid.load_inception(INCEPTION)  # loaded once for all tests (about a second)


def _fid_oracle():
    with np.load(ORACLE) as data:
        return {key: data[key] for key in data.files}


def _fid_scale(mu1, sigma1, mu2, sigma2):
    # FID is a difference of traces; errors are measured against the size of its terms.
    return np.trace(sigma1) + np.trace(sigma2) + np.sum((mu1 - mu2) ** 2) + 1e-12


_fid_dims = st.integers(2, 24)
_fid_seeds = st.integers(0, 2**32 - 1)
_fid_values = st.floats(-10, 10, allow_subnormal=False)


def _fid_sample_stats(draw, d):
    """Mean and covariance of hypothesis-drawn points: zeros, repeats and N <= d included."""
    x = draw(hnp.arrays(np.float64, (draw(st.integers(2, 2 * d + 4)), d), elements=_fid_values))
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


# ---------------------------------------------------------------- Frechet distance

@settings(max_examples=40, deadline=None)
@given(data=st.data(), d=st.integers(1, 16))
def test_fid_zero_for_identical_statistics(data, d):
    mu, sigma = _fid_sample_stats(data.draw, d)
    scale = _fid_scale(mu, sigma, mu, sigma)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-10 * scale


@settings(max_examples=40, deadline=None)
@given(data=st.data(), d=st.integers(1, 16))
def test_fid_symmetric_and_mean_shift_adds_squared_norm(data, d):
    (mu1, sigma1), (mu2, sigma2) = _fid_sample_stats(data.draw, d), _fid_sample_stats(data.draw, d)
    forward = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    backward = fid.frechet_distance(mu2, sigma2, mu1, sigma1)
    scale = _fid_scale(mu1, sigma1, mu2, sigma2)
    assert abs(forward - backward) <= 1e-10 * scale
    shift = data.draw(hnp.arrays(np.float64, d, elements=_fid_values))
    shifted = fid.frechet_distance(mu1 + shift, sigma1, mu2, sigma2)
    same_mean = fid.frechet_distance(mu2, sigma1, mu2, sigma2)  # only the covariance term
    expected = same_mean + np.sum((mu1 + shift - mu2) ** 2)
    assert abs(shifted - expected) <= 1e-10 * (scale + np.sum(shift**2))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), d=st.integers(1, 16))
def test_fid_closed_form_for_rank_one_covariances(data, d):
    # S1 = u u^T, S2 = v v^T: S1 S2 = (u.v) u v^T has the one eigenvalue (u.v)^2.
    u, v, d_mu = (data.draw(hnp.arrays(np.float64, d, elements=_fid_values)) for _ in range(3))
    expected = d_mu @ d_mu + u @ u + v @ v - 2 * abs(u @ v)
    ours = fid.frechet_distance(d_mu, np.outer(u, u), np.zeros_like(d_mu), np.outer(v, v))
    assert abs(ours - expected) <= 1e-10 * (d_mu @ d_mu + u @ u + v @ v + 1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=_fid_seeds, d=_fid_dims, commuting=st.booleans(),
       null_fraction=st.sampled_from([0, 0.3, 1]))
def test_fid_closed_form_for_diagonal_and_commuting_covariances(seed, d, commuting, null_fraction):
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T  =>  FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 5, d) ** 2, rng.uniform(0, 5, d) ** 2
    a[rng.random(d) < null_fraction] = 0  # null directions, up to S1 = 0
    q = scipy.stats.ortho_group.rvs(d, random_state=seed) if commuting else np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(ours - expected) <= 1e-9 * _fid_scale(mu1, sigma1, mu2, sigma2)


def _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's formula: scipy sqrtm of S1 S2 (a non-symmetric Schur method). Well posed only
    where S1 S2 is not singular: pytorch-fid then adds 1e-6 to the diagonals, which moves a
    rank-deficient result by ~sqrt(1e-6), so the tests use it on full-rank covariances only."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)   # never pass disp: scipy 1.18 removed it
    assert np.isfinite(covmean).all() and np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@example(seed=102215005, d=4, n1=33, n2=2)  # sqrtm + diagonal offset was 3e-4 off the exact value
@settings(max_examples=40, deadline=None)
@given(seed=_fid_seeds, d=_fid_dims, n1=st.integers(2, 50), n2=st.integers(2, 50))
def test_fid_equals_exact_references_including_rank_deficient(seed, d, n1, n2):
    # From the points themselves: S = B^T B with B = (x - mean) / sqrt(n - 1), so
    # tr((S1 S2)^1/2) = the nuclear norm of B1 B2^T (n1, n2), exact however singular S1 S2 is
    # (n <= d). Where both covariances have full rank, pytorch-fid's sqrtm formula must agree too.
    x1, x2 = _fid_random_points(seed, d, n1), _fid_random_points(seed + 1, d, n2)
    (mu1, mu2), (sigma1, sigma2) = (x1.mean(0), x2.mean(0)), (np.cov(x1.T), np.cov(x2.T))
    B1, B2 = (x1 - mu1) / math.sqrt(n1 - 1), (x2 - mu2) / math.sqrt(n2 - 1)
    exact = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2)
                  - 2 * np.linalg.svd(B1 @ B2.T, compute_uv=False).sum())
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    scale = _fid_scale(mu1, sigma1, mu2, sigma2)
    assert abs(ours - exact) <= 1e-9 * scale
    if n1 > d and n2 > d:
        assert abs(ours - _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2)) <= 1e-6 * scale


@settings(max_examples=25, deadline=None)
@given(seed=_fid_seeds, d=_fid_dims, n1=st.integers(2, 50), n2=st.integers(2, 50),
       cut=st.integers(1, 49))
def test_fid_from_the_features_own_factors_equals_the_eigendecomposition_route(seed, d, n1, n2,
                                                                               cut):
    """compute_statistics(return_factor=True) of N <= D images: C (D, N) with C C^T = sigma, from
    the features streamed in two batches (None once N > D); frechet_distance with both factors,
    one, or none gives one number (the factors skip the D x D eigendecompositions)."""
    x1, x2 = _fid_random_points(seed, d, n1), _fid_random_points(seed + 1, d, n2)
    stats = []
    for x in (x1, x2):
        feats = fid.FeatureStats()
        for part in (x[:cut], x[cut:]):
            if len(part):
                feats.update(torch.from_numpy(part))
        stats.append((*feats.mean_cov(), feats.factor()))
    (mu1, sigma1, c1), (mu2, sigma2, c2) = stats
    for x, sigma, c in ((x1, sigma1, c1), (x2, sigma2, c2)):
        if len(x) > d:
            assert c is None
        else:
            assert c.shape == (d, len(x))
            np.testing.assert_allclose(c @ c.T, np.cov(x.T), atol=1e-10 * np.abs(sigma).max())
    scale = _fid_scale(mu1, sigma1, mu2, sigma2)
    plain = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    for f1, f2 in ((c1, c2), (c1, None), (None, c2)):
        assert abs(fid.frechet_distance(mu1, sigma1, mu2, sigma2, f1, f2) - plain) <= 1e-9 * scale


def test_fid_float32_statistics_are_computed_in_float64():
    mu1, sigma1 = _fid_random_stats(0, 16, 40)
    mu2, sigma2 = _fid_random_stats(1, 16, 40)
    as32 = [v.astype(np.float32) for v in (mu1, sigma1, mu2, sigma2)]
    as64 = [v.astype(np.float64) for v in as32]
    assert fid.frechet_distance(*as32) == fid.frechet_distance(*as64)


# ---------------------------------------------------------------- Inception Score

def test_fid_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((50, 1008)), splits=10)
    assert abs(mean - 1) < 1e-12 and std < 1e-12


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 40), splits=st.integers(1, 10), per_class=st.integers(1, 3))
def test_fid_inception_score_of_k_confident_classes_in_equal_shares_is_k(k, splits, per_class):
    n = splits * k * per_class
    logits = np.zeros((n, 1008))
    logits[np.arange(n), np.arange(n) % k] = 60.0  # every split holds each class per_class times
    mean, std = fid.inception_score(logits, splits=splits)
    assert abs(mean - k) < 1e-9 * k and std < 1e-9 * k


def test_fid_inception_score_by_hand_with_unequal_kls_and_split_marginals():
    """Two classes, two splits. Split 1: a confident class-0 image and a uniform one, marginal
    p(y) = (3/4, 1/4), KLs log(4/3) and log(4/3) / 2, so exp(mean KL) = (4/3)^(3/4). Split 2: two
    confident class-1 images, marginal (0, 1), KLs 0, score 1. IS = mean and std of the two
    (a marginal over all four images, or the mean of exp(KL), gives other numbers)."""
    logits = np.array([[60.0, 0.0], [0.0, 0.0], [0.0, 60.0], [0.0, 60.0]])   # e^-60: exactly 0
    first = (4 / 3) ** 0.75
    mean, std = fid.inception_score(logits, splits=2)
    assert abs(mean - (first + 1) / 2) < 1e-12 and abs(std - (first - 1) / 2) < 1e-12
    one_split = fid.inception_score(logits, splits=1)[0]          # marginal (3/8, 5/8)
    kls = [math.log(8 / 3), 0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5), math.log(8 / 5),
           math.log(8 / 5)]
    assert abs(one_split - math.exp(sum(kls) / 4)) < 1e-12


# ---------------------------------------------------------------- streaming statistics, .npz

@settings(max_examples=25, deadline=None)
@given(seed=_fid_seeds, n=st.integers(2, 60), d=st.integers(1, 12),
       offset=st.sampled_from([0.0, 1e4]))
def test_fid_feature_stats_stream_equals_numpy(seed, n, d, offset):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, d)) + offset  # a large offset would cancel naive sums
    stats = fid.FeatureStats()
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, 3), replace=False))
    for chunk in np.split(features, cuts):
        stats.update(torch.from_numpy(chunk.astype(np.float32)) if seed % 2 else chunk)
    features = features.astype(np.float32).astype(np.float64) if seed % 2 else features
    mu, sigma = stats.mean_cov()
    assert stats.n == n and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.atleast_2d(np.cov(features, rowvar=False)), rtol=1e-9,
                               atol=1e-9)


def test_fid_statistics_npz_round_trip_with_pytorch_fid_keys(tmp_path):
    mu, sigma = _fid_random_stats(0, 6, 10)
    fid.save_statistics(tmp_path / "s.npz", mu, sigma, convention="tf")
    with np.load(tmp_path / "s.npz") as data:  # what pytorch-fid reads
        np.testing.assert_array_equal(data["mu"], mu)
        np.testing.assert_array_equal(data["sigma"], sigma)
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma)  # what it writes
    loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / "theirs.npz")
    assert loaded_mu.dtype == np.float64 and np.array_equal(loaded_sigma, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "bad.npz")


# ---------------------------------------------------------------- preprocessing and extraction

def test_fid_tf1_resize_is_src_equals_dst_times_scale_clamped():
    x = torch.tensor([[10.0, 30.0]])  # a 1 x 2 image row, upsampled to 4: src = 0, 0.5, 1, 1.5
    out = x @ fid._tf1_resize_matrix(2, 4, "cpu").T
    assert out.tolist() == [[10.0, 20.0, 30.0, 30.0]]  # last sample clamps to the edge
    down = torch.arange(6.0)[None] @ fid._tf1_resize_matrix(6, 4, "cpu").T  # src = 0, 1.5, 3, 4.5
    assert down.tolist() == [[0.0, 1.5, 3.0, 4.5]]


def test_fid_resize_of_a_two_pixel_edge_by_hand_in_both_conventions():
    """A 2 x 2 image, black left column, white right, resized to 299 by hand. tf (TF1, the
    papers'): src = dst * 2/299, so column j is 255 * 2j/299 up to j = 149 and white from 150.
    pytorch-fid (align_corners=False): src = (dst + 0.5) * 2/299 - 0.5, clamped: black up to
    column 74, half grey at 149, white from 224. Every row and channel alike; the transposed
    image gives the transposed result."""
    image = torch.tensor([[0, 255], [0, 255]], dtype=torch.uint8).expand(1, 3, 2, 2)
    j = torch.arange(299, dtype=torch.float64)
    tf_row = (255 * (2 * j / 299).clamp(max=1) - 128) / 128       # value map (x - 128) / 128
    src = ((j + 0.5) * 2 / 299 - 0.5).clamp(0, 1)
    torch_row = 2 * src - 1                                         # x / 255 * 2 - 1, x = 255 src
    assert torch_row[74] == -1 and torch_row[149] == 0 and torch_row[224] == torch_row[298] == 1
    for convention, row in (("tf", tf_row), ("pytorch-fid", torch_row)):
        out = fid.preprocess(image, convention).double()
        assert out.shape == (1, 3, 299, 299)
        torch.testing.assert_close(out, row.expand(1, 3, 299, 299), rtol=0, atol=1e-5)
        transposed = fid.preprocess(image.transpose(2, 3), convention).double()
        torch.testing.assert_close(transposed, out.transpose(2, 3), rtol=0, atol=1e-5)


def test_fid_preprocess_at_299_is_only_the_value_map():
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(fid.preprocess(images, "tf"), (images.float() - 128) / 128)
    torch.testing.assert_close(fid.preprocess(images, "pytorch-fid"), images.float() / 255 * 2 - 1)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    assert torch.equal(fid.preprocess(nhwc), fid.preprocess(images))
    with pytest.raises(ValueError, match="convention"):
        fid.preprocess(images, "clean-fid")


def test_fid_inception_refuses_a_batch_that_is_not_preprocessed():
    model = fid.FIDInceptionV3(with_fc=False)
    # unbatched (3, 299, 299) would run through the convolutions; NHWC and 32 px would fail deep
    for shape in [(3, 299, 299), (2, 299, 299, 3), (2, 3, 32, 32), (2, 1, 299, 299)]:
        with pytest.raises(ValueError, match=re.escape(f"(N, 3, 299, 299) batch, got {shape}")):
            model(torch.zeros(shape))
    with torch.no_grad():
        features, logits = model(torch.zeros(1, 3, 299, 299))
    assert features.shape == (1, 2048) and logits is None


def test_fid_batches_are_cut_to_batch_size_and_streams_are_accepted():
    model, rng = _FidStandIn(), np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    mu, sigma = fid.compute_statistics(torch.from_numpy(images), model=model, batch_size=2)
    assert model.seen_batch_sizes == [2, 2, 1]
    stream = (images[i:j].transpose(0, 2, 3, 1) for i, j in ((0, 3), (3, 5)))  # NHWC numpy batches
    mu_stream, sigma_stream = fid.compute_statistics(stream, model=model, batch_size=2)
    assert model.seen_batch_sizes[3:] == [2, 1, 2]
    np.testing.assert_allclose(mu_stream, mu, rtol=0, atol=1e-6 * np.abs(mu).max())
    np.testing.assert_allclose(sigma_stream, sigma, rtol=0, atol=1e-6 * np.abs(sigma).max())


def test_fid_progress_line_only_when_slow_with_rate_and_time_left(monkeypatch, capsys):
    images = np.zeros((6, 8, 8, 3), np.uint8)
    # Both clocks are fake: with the real one, a loaded or paused machine made the fast case slow.
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=lambda: 0.0))   # a fast machine
    fid.compute_statistics(images, model=_FidStandIn(), batch_size=2, progress=True)
    assert capsys.readouterr().err == ""  # fast: quiet
    clock = iter(range(0, 1000, 20))  # a slow machine: 20 s between any two looks at the clock
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    fid.compute_statistics(images, model=_FidStandIn(), batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "Inception features 2/6" in err and "img/s" in err and "s left" in err
    assert err.endswith("s in all\n")


def test_fid_tf32_is_off_during_extraction_and_restored_after():
    b, before = torch.backends, _fid_tf32_flags()
    try:  # a caller that turned TF32 on
        torch.set_float32_matmul_precision("high")
        if hasattr(b.cuda.matmul, "fp32_precision"):
            b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = "tf32", "tf32"
            b.mkldnn.conv.fp32_precision = "bf16"
        caller = _fid_tf32_flags()
        model = _FidStandIn()
        images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
        fid.compute_statistics(images, model=model)
        inside = model.seen_precisions[0]
        assert inside[0] == "highest" and not {"tf32", "bf16", True} & set(inside[1:])
        assert _fid_tf32_flags() == caller
    finally:
        torch.set_float32_matmul_precision(before[0])
        if hasattr(b.cuda.matmul, "fp32_precision"):
            (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
             b.mkldnn.conv.fp32_precision) = before[1:]


# ---------------------------------------------------------------- weights: resolution and download

def test_fid_download_is_checked_and_atomic(tmp_path):
    source = tmp_path / "remote.pth"
    source.write_bytes(os.urandom(3000))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "weights.pth"
    with pytest.raises(ValueError, match="SHA256 [0-9a-f]{64}, expected 0{64}"):
        fid.download(source.as_uri(), dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left
    assert fid.download(source.as_uri(), dest, digest).read_bytes() == source.read_bytes()
    assert list(dest.parent.iterdir()) == [dest]


def test_fid_weights_resolution_order_and_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", (tmp_path / "nowhere.pth").as_uri())
    cached = tmp_path / ".cache" / "sra2" / fid.FID_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=f"{fid.WEIGHTS_ENV}") as error:
        fid.load_inception()
    assert str(cached) in str(error.value) and "\n" not in str(error.value)
    message = str(error.value)
    assert "--weights" in message and "--inception" in message and "shared" not in message
    assert not cached.exists()  # a failed download leaves nothing behind
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.touch()  # an empty file: the error names the file that was chosen
    with pytest.raises(ValueError, match=re.escape(f"{cached}: not the FID Inception weights")):
        fid.load_inception()  # the cache, with no argument and no environment variable
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {tmp_path / 'env.pth'}")):
        fid.load_inception()  # the environment variable before the cache
    with pytest.raises(FileNotFoundError, match=re.escape(f"not found: {tmp_path / 'arg.pth'}")):
        fid.load_inception(tmp_path / "arg.pth")  # the argument before both


# ---------------------------------------------------------------- the real network

@pytest.mark.slow
@needs_shared(INCEPTION, ORACLE)
@pytest.mark.parametrize("convention", ["tf", "pytorch-fid"])
def test_fid_features_reproduce_the_oracle(convention):
    oracle = _fid_oracle()
    for size in (32, 64, 299):
        with torch.no_grad():
            features, logits = _fid_model()(fid.preprocess(oracle[f"images_{size}"], convention))
        reference = oracle[f"{convention.replace('-', '_')}_{size}"]
        relative = (np.linalg.norm(features.numpy() - reference, axis=1)
                    / np.linalg.norm(reference, axis=1))
        assert relative.max() < 1e-5, (size, relative)  # 1e-4 is the goal; measured 4e-6
        assert logits is None  # the nofc file


@pytest.mark.slow
@needs_shared(INCEPTION, ORACLE)
def test_fid_statistics_do_not_depend_on_batching_or_layout():
    images = _fid_oracle()["images_32"][:4]  # (4, 32, 32, 3) NHWC numpy
    mu, sigma = fid.compute_statistics(images, model=_fid_model(), batch_size=4)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    streamed = iter([nchw[:1], nchw[1:]])  # batches of 1 and 3, re-cut to 1, 2, 1
    mu_b, sigma_b = fid.compute_statistics(streamed, model=_fid_model(), batch_size=2, total=4)
    np.testing.assert_allclose(mu_b, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma_b, sigma, rtol=0, atol=1e-5 * np.abs(sigma).max())


@pytest.mark.slow
@needs_shared(INCEPTION, ORACLE, INCEPTION_FP16)
def test_fid_fp16_file_with_fc_loads_as_float32_and_logits_have_no_bias(tmp_path):
    state = torch.load(INCEPTION_FP16, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = (torch.randn(1008, 2048, generator=generator) / 45).half()
    state["fc.bias"] = torch.randn(1008, generator=generator).half()
    torch.save(state, tmp_path / "with_fc.pth")
    model = fid.load_inception(tmp_path / "with_fc.pth")
    assert all(p.dtype == torch.float32
               for p in model.state_dict().values() if p.is_floating_point())
    oracle = _fid_oracle()
    mu, _, logits = fid.compute_statistics(oracle["images_299"], model=model, return_is_logits=True)
    assert logits.shape == (2, 1008)
    # fp16 weights move the mean feature by 2.8e-3 (measured): as much as the 0.25% between the
    # two conventions' means at 299 px, so this checks the loading, not the convention.
    reference = oracle["tf_299"].mean(axis=0)
    assert np.linalg.norm(mu - reference) / np.linalg.norm(reference) < 4e-3
    weight = model.fc.weight.double().numpy()
    # linear, no bias
    np.testing.assert_allclose(logits.mean(axis=0), mu @ weight.T, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_shared(INCEPTION, ORACLE)
def test_fid_nofc_weights_refuse_inception_score_clearly():
    with pytest.raises(ValueError, match="fc"):
        fid.compute_statistics(_fid_oracle()["images_32"][:2], model=_fid_model(),
                               return_is_logits=True)


@pytest.mark.slow
@needs_shared(INCEPTION, ORACLE)
def test_fid_cli_saves_folder_statistics_and_names_the_convention(tmp_path, capsys):
    oracle = _fid_oracle()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(oracle["images_32"][:3]):
        Image.fromarray(image).save(folder / f"{i}.png")
    fid.main([str(folder), str(tmp_path / "a.npz"), "--save-stats", "--weights", str(INCEPTION),
              "--device", "cpu", "--batch-size", "2"])
    mu, sigma = fid.load_statistics(tmp_path / "a.npz")
    features = oracle["tf_32"][:3].astype(np.float64)
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=0,
                               atol=1e-4 * np.abs(features).max())
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=0,
                               atol=1e-4 * np.abs(sigma).max())
    # The FID path, on small statistics (a 2048-d FID costs seconds): identical covariances, so
    # FID = |shift|^2.
    mu, sigma = _fid_random_stats(0, 16, 40)
    shift = np.random.default_rng(0).standard_normal(16)
    fid.save_statistics(tmp_path / "a16.npz", mu, sigma, convention="tf")
    fid.save_statistics(tmp_path / "b16.npz", mu + shift, sigma, convention="tf")
    capsys.readouterr()
    value = fid.main([str(tmp_path / "a16.npz"), str(tmp_path / "b16.npz")])
    assert f"FID (tf convention): {value:.4f}" in capsys.readouterr().out
    assert abs(value - np.sum(shift**2)) < 1e-9 * np.sum(shift**2)
    fid.save_statistics(tmp_path / "c16.npz", mu, sigma, convention="pytorch-fid")
    line = _fid_error_line(capsys, [tmp_path / "a16.npz", tmp_path / "c16.npz"])
    assert "different conventions" in line


# =============================================================================================
# The demo (tiny_demo.py, demo_infra.py): its pieces against independent computations, the
# held-out loss, the whole pipeline with tiny settings, exact resume after SIGKILL, torchrun DDP
# equal to one process
# =============================================================================================


class FakeFID:
    """Stands in for the Inception FID where a test checks plumbing, not FID: a number per image
    set."""

    def __init__(self, s, images, data_id, device):
        self.n_ref = min(s.fid_ref_n, len(images))

    def __call__(self, images):
        return 1.0 + float(np.asarray(images, np.float64).mean())


# 12 steps, a checkpoint (and log line) every 3, FID at steps 6 and 12, plumbing-only FID.
# fp32: the bitwise and float-rounding claims below are fp32's, on any CPU (auto is bf16 on one
# with native bf16, where two half batches round differently from one whole batch).
RESUME = [*TINY, "--steps", "12", "--evals", "2", "--ckpt-every", "3", "--precision", "fp32"]


# The child processes (a SIGKILLed run, torchrun's ranks) run this: tiny_demo.main with the
# stand-in FID, and optionally a SIGKILL inside torch.save of the checkpoint at step KILL_STEP
# of run KILL_RUN, after half the file is written (what a kill during a save does).
CHILD = '''
import io, os, signal, sys
import numpy as np, torch
import tiny_demo

class FakeFID:
    def __init__(self, s, images, *args):
        self.n_ref = min(s.fid_ref_n, len(images))

    def __call__(self, images):
        return 1.0 + float(np.asarray(images, np.float64).mean())

tiny_demo.FIDMeter = FakeFID
kill_run, kill_step = os.environ.get("KILL_RUN"), int(os.environ.get("KILL_STEP", "0"))
real_save = torch.save

def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == kill_step and obj["run"]["name"] == kill_run:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(f, "wb") as half:
            half.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            half.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

torch.save = save
tiny_demo.main(sys.argv[1:])
'''


def run_child(argv, env=None):
    return subprocess.Popen([sys.executable, "-c", CHILD, *argv], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def demo_args(root, out="out", *extra, cache=None):
    return [*RESUME, "--out", str(root / out), "--cache", str(cache or root / "cache"), *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run of RESUME (both models), with the stand-in FID: its out/ and
    records."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_demo, "FIDMeter", FakeFID)
        records = tiny_demo.main(demo_args(root))
    return root, records


def assert_same_checkpoint(a, b, atol=0.0):
    """Weights, EMA, projector and optimizer state of two checkpoint files: equal (atol 0:
    bitwise)."""
    a, b = (torch.load(p, weights_only=True) for p in (a, b))
    assert a["step"] == b["step"]
    for key in ("model", "ema", "projector"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], rtol=0, atol=atol), (key, name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in sa:
            assert torch.allclose(sa[name].float(), sb[name].float(), rtol=1e-4 if atol else 0,
                                  atol=atol), name
    return a, b


# ---------------------------------------------------------------- pieces, computed independently

@pytest.mark.slow
@needs_shared(INCEPTION)
def test_fid_meter_with_the_real_inception_is_fid_py(tmp_path):
    """FIDMeter: the reference is the first fid_ref_n images' statistics, cached under a key of
    data, count and weights; a FID is fid.frechet_distance of fid.compute_statistics."""
    s = tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--inception", str(INCEPTION)])
    images, _ = tiny_demo.synthetic_images(40, seed=1)
    s.fid_ref_n = 30
    meter = tiny_demo.FIDMeter(s, images, "test", torch.device("cpu"))
    mu, sigma = fid.compute_statistics(images[:30], meter.model)
    assert np.allclose(meter.mu, mu, atol=1e-6) and np.allclose(meter.sigma, sigma, atol=1e-6)
    expected = fid.frechet_distance(mu, sigma, *fid.compute_statistics(images[30:], meter.model))
    assert meter(images[30:]) == pytest.approx(expected, rel=1e-6) and expected > 0
    assert (tmp_path / "fid-ref-{}.npz".format(
        tiny_demo.digest("test", 30, "tf", INCEPTION.name, INCEPTION.stat().st_size))).is_file()


def test_fid_meter_is_fid_py_against_its_cached_reference(tmp_path, monkeypatch):
    """FIDMeter with a cheap stand-in network (6 features an image): its reference is the first
    fid_ref_n images' statistics, cached once; a FID is fid.frechet_distance of
    fid.compute_statistics."""
    class MeanStd(torch.nn.Module):
        def forward(self, x):                                          # (N, 3, 299, 299) -> (N, 6)
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1), None
    monkeypatch.setattr(fid, "load_inception", lambda *args: MeanStd())
    s = tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--fid-ref-n", "30"])
    images = tiny_demo.synthetic_images(40, seed=2)[0]
    meter = tiny_demo.FIDMeter(s, images, "d", torch.device("cpu"))
    mu, sigma = fid.compute_statistics(images[:30], MeanStd(), device="cpu")
    assert np.allclose(meter.mu, mu, atol=1e-12) and np.allclose(meter.sigma, sigma, atol=1e-12)
    expected = fid.frechet_distance(mu, sigma, *fid.compute_statistics(images[30:], MeanStd(),
                                                                      device="cpu"))
    assert meter(images[30:]) == pytest.approx(expected, rel=1e-9) and expected > 0
    assert len(list(tmp_path.glob("fid-ref-*.npz"))) == 1


def test_long_times_are_in_hours():
    assert [fid.fmt_time(s) for s in (3.24, 42, 425, 3599, 7500, 865722)] == [
        "3.2s", "42s", "7m05s", "59m59s", "2h05m", "240h"]


def test_quick_conflicts_with_another_preset(capsys):
    assert error_line(capsys, ["--quick", "--preset", "cpu"]) == \
        "tiny_demo: error: --quick is --preset quick: it conflicts with --preset cpu"
    assert tiny_demo.parse_args(["--quick", "--preset", "quick"]).preset == "quick"
    assert tiny_demo.parse_args([]).preset == "full"


def test_no_final_fid_column_without_a_final_fid(reference_run):
    """--final-fid-n 0: the table has no final-FID column (no "FID-0k" header of dashes)."""
    _, records = reference_run
    s = tiny_demo.parse_args([*RESUME, "--final-fid-n", "0"])
    tiny_demo.check(s)
    runs = [("", "", tiny_demo.make_run(s, name, name, name == "sra2"))
            for name in ("baseline", "sra2")]
    lines = tiny_demo.seed_table(s, runs, records, 0)
    assert "FID-0" not in lines[1] and "FID-3 2-step" in lines[1]
    cells = lambda line: re.split(r"\s{2,}", line.strip())
    assert len(cells(lines[1])) == len(cells(lines[3])) == 10          # a cell under every head


def test_cpu_preset_settings():
    s = tiny_demo.parse_args(["--preset", "cpu"])
    tiny_demo.check(s)
    assert (s.model, s.steps, s.batch_size, s.seeds, s.threads, s.heldout_n, s.heldout_evals,
            s.evals) == ("small", 1200, 64, [0, 1], 2, 1000, 8, 3)
    assert tiny_demo.model_config(s).depth == 8
    assert tiny_demo.parse_args(["--preset", "cpu", "--steps", "7"]).steps == 7
    assert tiny_demo.describe(s) == (
        "preset cpu: small, 1200 steps of batch 64, lr 0.0003, joint clip 1, auto, seeds [0, 1], "
        "baseline, sra2; held-out loss on 1000 test images at 8 checkpoints; "
        "FID-250 25-step at 3 checkpoints")


def test_demo_defaults_are_the_papers_sra2_settings():
    """Every preset runs the paper's SRA 2: EMA capped at 0.9999, label dropout 0.1, lambda 1,
    smooth-L1, t in [0, 1], a 5-layer projector of width 2D, the clean latent as target; the
    full preset aligns SiT-S/2's block 2 and ends with the papers' 250-step SDE. The depth
    sweep aligns at the paper's fraction of depth: 1/6 up to 12 blocks, 1/3 from 24 (at least 1)."""
    for preset in tiny_demo.PRESETS:
        s = tiny_demo.parse_args(["--preset", preset])
        tiny_demo.check(s)
        assert (s.ema_decay, s.lam, s.align_loss, s.t_range, s.mlp_depth, s.mlp_width, s.target,
                s.target_scale) == (0.9999, 1.0, "smooth_l1", (0.0, 1.0), 5, None, "mean", 1.0)
        assert tiny_demo.model_config(s).class_dropout_prob == 0.1
    s = tiny_demo.parse_args([])
    tiny_demo.check(s)
    assert (s.model, s.align_depth, s.final_sampling_steps) == ("SiT-S/2", 2, 250)
    assert tiny_demo.make_run(s, "sra2", "", True).settings == (
        "block 2, smooth_l1, lambda 1, t in [0, 1], 5-layer MLP of width 2D")
    sweep = {name: tiny_demo.model_config(tiny_demo.parse_args(["--model", name])).align_depth
             for name in ("6x64", "12x64", "24x64", "3x128", "6x128", "12x128")}
    assert sweep == {"6x64": 1, "12x64": 2, "24x64": 8, "3x128": 1, "6x128": 1, "12x128": 2}


def test_read_cifar_folder_and_archive_agree(tmp_path):
    folder, images, labels = write_cifar_folder(tmp_path / "data")
    for path in (folder, folder.parent):                               # the folder or its parent
        got_images, got_labels = demo_infra.read_cifar(path)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    got_images, got_labels = demo_infra.read_cifar(archive)
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_read_cifar_layout_is_rgb_planes():
    """Row layout of the official files: 1024 R, then 1024 G, then 1024 B, row-major 32x32."""
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0], row[0, 1024 + 33], row[0, 2048 + 1023] = 10, 20, 30     # R(0,0), G(1,1), B(31,31)
    raw = pickle.dumps({b"data": row, b"labels": [3]})
    image, label = demo_infra.parse_cifar_batch("x", raw)
    assert image[0, 0, 0, 0] == 10 and image[0, 1, 1, 1] == 20 and image[0, 31, 31, 2] == 30
    assert label[0] == 3


def test_download_keeps_only_a_verified_archive(tmp_path, monkeypatch):
    payload = b"not really cifar" * 1000

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def __enter__(self):
            return self

    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: Response(payload))
    with pytest.raises(tiny_demo.DemoError, match="MD5 [0-9a-f]{32}, expected .*run again"):
        demo_infra.download_cifar(tmp_path)
    # nothing half-written survives
    assert list(tmp_path.iterdir()) == []

    class Broken(Response):
        def read(self, n=-1):
            raise ConnectionResetError("connection reset")
    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: Broken(payload))
    with pytest.raises(tiny_demo.DemoError, match="could not download"):
        demo_infra.download_cifar(tmp_path)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(fid.urllib.request, "urlopen", lambda *a, **k: Response(payload))
    monkeypatch.setattr(demo_infra, "CIFAR_MD5", hashlib.md5(payload).hexdigest())
    archive = demo_infra.download_cifar(tmp_path)
    assert archive.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]


def test_batch_order_is_a_pure_function_of_seed_and_step():
    n, b = 50, 8
    epoch = [tiny_demo.batch_indices(k, n, b, seed=3) for k in range(n // b)]
    seen = torch.cat([idx for idx, _ in epoch])
    # each image at most once per epoch
    assert len(set(seen.tolist())) == len(seen) == (n // b) * b
    # out of order, after other keys
    again = tiny_demo.batch_indices(2, n, b, seed=3)
    tiny_demo.batch_indices(100, n, b, seed=4)
    assert torch.equal(tiny_demo.batch_indices(2, n, b, seed=3)[0], again[0])
    assert torch.equal(again[0], epoch[2][0])
    next_epoch = torch.cat([tiny_demo.batch_indices(k, n, b, seed=3)[0]
                            for k in range(n // b, 2 * (n // b))])
    # a fresh permutation per epoch, and the epoch's last partial batch (2 images) is dropped
    assert not torch.equal(next_epoch, seen) and len(set(next_epoch.tolist())) == 48
    assert all(len(tiny_demo.batch_indices(k, n, b, seed=3)[0]) == b for k in range(3 * (n // b)))
    # each image's flip bit is its own for the epoch (epoch_order's bit of that image)
    flips = tiny_demo.epoch_order(3, 1, n)[1]
    for k in range(n // b, 2 * (n // b)):
        idx, flip = tiny_demo.batch_indices(k, n, b, seed=3)
        assert torch.equal(flip, flips[idx])


def test_step_noise_is_uniform_t_gaussian_eps_and_drops_the_models_label_rate():
    """One step's draws on a fixed generator: t ~ U[0, 1), eps ~ N(0, I) and the label-drop mask
    at the model's class_dropout_prob (0.1, the paper's), each within 5 standard errors of
    20,000 draws; the same (seed, step) gives the same draws, another step others."""
    n, g = 20_000, torch.Generator()
    rate = tiny_demo.model_config(tiny_demo.parse_args([])).class_dropout_prob
    t, eps, drop = tiny_demo.step_noise(g, 3, 7, (n, 1, 1, 1), rate)
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.1) < 5 * math.sqrt(
        0.1 * 0.9 / n)
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(t.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert abs(eps.mean().item()) < 5 / math.sqrt(n) and abs(eps.var().item() - 1) < 5 * math.sqrt(
        2 / n)
    again = tiny_demo.step_noise(g, 3, 7, (n, 1, 1, 1), rate)
    other = tiny_demo.step_noise(g, 3, 8, (n, 1, 1, 1), rate)
    assert all(torch.equal(a, b) for a, b in zip((t, eps, drop), again))
    assert not torch.equal(t, other[0]) and not torch.equal(eps, other[1])


def test_stage1_cache_is_keyed_by_settings_and_latents_are_normalised(tmp_path, capsys):
    s = tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--vae-steps", "2"])
    tiny_demo.check(s)
    images, _ = tiny_demo.synthetic_images(16)
    first = tiny_demo.stage1(images, "data-a", s, torch.device("cpu"))
    assert abs(first.latents.mean()) < 0.02 and abs(first.latents.std() - 1) < 0.02
    assert first.latents.shape == (2, 16, 4, 16, 16)
    assert ", made in " in capsys.readouterr().out
    again = tiny_demo.stage1(images, "data-a", s, torch.device("cpu"))
    assert ", read from the cache (made in " in capsys.readouterr().out
    assert torch.equal(first.latents, again.latents)
    assert len(list(tmp_path.glob("stage1-*.pt"))) == 1
    s.vae_kl = 1e-3
    tiny_demo.stage1(images, "data-a", s, torch.device("cpu"))
    tiny_demo.stage1(images, "data-b", s, torch.device("cpu"))
    # new settings, new data: new keys
    assert len(list(tmp_path.glob("stage1-*.pt"))) == 3
    # the mirror latents are the encodings of the mirrored images
    x = tiny_demo.to_float(torch.from_numpy(images[:2]))
    mirror = (first.vae.encode(x.flip(3))[0] - first.shift) * first.scale
    assert torch.allclose(mirror, first.latents[1, :2], atol=2e-2)     # stored in float16


def test_decode_undoes_the_latent_normalisation():
    """Stage 1 stores latents as (z - shift) * scale; decode must map them back, z / scale + shift,
    before the VAE decoder (an identity here), then to uint8: the images come back exactly."""
    images = torch.from_numpy(tiny_demo.synthetic_images(4, seed=3)[0])   # (4, 32, 32, 3) uint8
    stage = SimpleNamespace(vae=SimpleNamespace(decode=lambda x: x), shift=0.3, scale=2.5)
    normalised = (tiny_demo.to_float(images) - stage.shift) * stage.scale
    assert torch.equal(tiny_demo.decode(stage, normalised), images)


@pytest.mark.usefixtures("one_thread")
def test_unreadable_cache_files_are_rebuilt(tmp_path, capsys, monkeypatch):
    """A torn stage-1 cache or FID-reference file is made again, with a note (a cache holds nothing
    that cannot be rebuilt)."""
    s = tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--vae-steps", "1"])
    tiny_demo.check(s)
    images, _ = tiny_demo.synthetic_images(8)
    first = tiny_demo.stage1(images, "d", s, torch.device("cpu"))
    [cached] = tmp_path.glob("stage1-*.pt")
    cached.write_bytes(cached.read_bytes()[:100])
    again = tiny_demo.stage1(images, "d", s, torch.device("cpu"))
    assert torch.equal(first.latents, again.latents) and "is unreadable" in capsys.readouterr().out

    class MeanStd(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1), None
    monkeypatch.setattr(tiny_demo.fid, "load_inception", lambda *args: MeanStd())
    meter = tiny_demo.FIDMeter(s, images, "d", torch.device("cpu"))
    [ref] = tmp_path.glob("fid-ref-*.npz")
    ref.write_bytes(b"torn")
    again = tiny_demo.FIDMeter(s, images, "d", torch.device("cpu"))
    assert np.array_equal(meter.mu, again.mu) and "is unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------- stage 1: TAEF2 (--vae taef2)

# TAEF2's released weights and an oracle made with the released code: $SRA2_TAEF2, else SHARED
TAEF2_DIR = Path(os.environ.get(demo_infra.TAEF2_ENV) or SHARED / "weights")
TAEF2_FILES = [TAEF2_DIR / f"taef2_{part}.pth" for part in ("encoder", "decoder")]
TAEF2_ORACLE = TAEF2_DIR / "taef2_reference.npz"
needs_taef2 = pytest.mark.skipif(
    not all(path.is_file() for path in [*TAEF2_FILES, TAEF2_ORACLE]),
    reason=f"needs taef2_encoder.pth, taef2_decoder.pth and taef2_reference.npz in {TAEF2_DIR} "
    f"(set {demo_infra.TAEF2_ENV} to their folder)")
NO_FID = ["--evals", "0", "--final-fid-n", "0"]


def relative_error(got, want):
    """max |got - want| / max |want|."""
    want = torch.as_tensor(want)
    return ((got - want).abs().max() / want.abs().max()).item()


@needs_taef2
@pytest.mark.usefixtures("one_thread")
def test_taef2_forward_passes_reproduce_the_released_code():
    """Encoder and decoder in float32 against latents and decodings computed with the released
    code (the architecture, each layer's place and the parameter names: the load is strict)."""
    oracle, model = np.load(TAEF2_ORACLE), demo_infra.load_taef2(TAEF2_DIR, None)
    with torch.no_grad():
        assert relative_error(model.encoder(torch.from_numpy(oracle["images_64"])),
                              oracle["latents"]) < 1e-5
        for z, x in (("latents", "decoded"), ("random_latents", "random_decoded")):
            assert relative_error(model.decoder(torch.from_numpy(oracle[z])), oracle[x]) < 1e-5
        # The demo's interface: 32-px images in [-1, 1], bicubic-upsampled to 64 px (as the
        # oracle's images_64 were made from images_32); decodings clamped, area-downsampled.
        x = tiny_demo.to_float(torch.from_numpy(oracle["images_32"]))
        assert relative_error(model.encode(x)[0], oracle["latents"][:4]) < 1e-5
        assert model.encode(x)[1] is None                      # deterministic: no posterior
        area = F.interpolate(torch.from_numpy(oracle["decoded"]).clamp(0, 1), size=32,
                             mode="area") * 2 - 1
        assert relative_error(model.decode(torch.from_numpy(oracle["latents"])), area) < 1e-5


def test_taef2_weights_that_are_not_the_release_are_refused(tmp_path, capsys):
    """A wrong file (a state dict of the right names: a strict load would take it) and a truncated
    one are refused by their SHA-256 in one line, exit status 2, before stage 1 writes a thing; a
    missing one is named."""
    folder, cache = tmp_path / "weights", tmp_path / "cache"
    folder.mkdir()
    argv = [*TINY, *NO_FID, "--vae", "taef2", "--taef2", str(folder), "--cache", str(cache),
            "--out", str(tmp_path / "out")]
    encoder = folder / "taef2_encoder.pth"
    torch.save(demo_infra.TAEF2().encoder.state_dict(), encoder)
    assert "taef2_encoder.pth: SHA-256" in error_line(capsys, argv)
    real = TAEF2_FILES[0].read_bytes() if TAEF2_FILES[0].is_file() else encoder.read_bytes()
    encoder.write_bytes(real[:len(real) // 2])
    line = error_line(capsys, argv)
    assert f"{encoder}: SHA-256" in line and "wrong or truncated" in line
    if TAEF2_FILES[0].is_file():                               # the encoder passes: the decoder
        encoder.write_bytes(real)
        assert error_line(capsys, argv).endswith(f"--taef2 {folder}: no taef2_decoder.pth there")
    assert list(cache.glob("stage1-*")) == []


@needs_taef2
def test_taef2_weights_download_once_with_their_sha256(tmp_path, monkeypatch):
    """No folder given: both files come from the release (here a local stand-in for GitHub) into
    the cache, once; a corrupt transfer keeps nothing and says so in one line."""
    assert demo_infra.TAEF2_URL.format("encoder") == \
        "https://github.com/madebyollin/taesd/raw/main/taef2_encoder.pth"
    release, cache = tmp_path / "release", tmp_path / "cache"
    release.mkdir()
    for path in TAEF2_FILES:
        shutil.copy(path, release)
    monkeypatch.setattr(demo_infra, "TAEF2_URL", release.as_uri() + "/taef2_{}.pth")
    model = demo_infra.load_taef2(None, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["taef2_decoder.pth", "taef2_encoder.pth"]
    (release / "taef2_encoder.pth").unlink()                   # the cache is used from now on
    assert torch.equal(demo_infra.load_taef2(None, cache).encoder[0].weight,
                       model.encoder[0].weight)
    (cache / "taef2_decoder.pth").unlink()
    (release / "taef2_decoder.pth").write_bytes(TAEF2_FILES[1].read_bytes()[:-1])   # truncated
    with pytest.raises(demo_infra.DemoError, match="could not download TAEF2's decoder .*SHA256"):
        demo_infra.load_taef2(None, cache)
    assert not (cache / "taef2_decoder.pth").exists()


def test_taef2_default_folder_is_the_environment_variable(monkeypatch):
    monkeypatch.setenv(demo_infra.TAEF2_ENV, "/somewhere/taef2")
    assert tiny_demo.parse_args(["--vae", "taef2"]).taef2 == "/somewhere/taef2"
    assert tiny_demo.parse_args(["--taef2", "here"]).taef2 == "here"


def test_taef2_refuses_a_posterior_sample_target(tmp_path, capsys):
    line = error_line(capsys, [*TINY, "--vae", "taef2", "--target", "sample", "--out",
                               str(tmp_path)])
    assert line == ("tiny_demo: error: --target sample needs --vae own (TAEF2's encoder is "
                    "deterministic: there is no posterior to sample)")
    tiny_demo.check(tiny_demo.parse_args([*TINY, "--target", "sample"]))     # own: fine


@pytest.mark.parametrize("model", ["SiT-S/2", "tiny", "24x64"])
def test_model_config_follows_the_vae(model):
    """Own VAE: 16x16x4 in 2x2 patches; TAEF2: 8x8x32 in 1x1 patches; 64 tokens either way, the
    rest of the SiT the same."""
    own, taef2 = (tiny_demo.model_config(tiny_demo.parse_args(["--model", model, "--vae", vae]))
                  for vae in ("own", "taef2"))
    assert (own.in_channels, own.input_size, own.patch_size) == (4, 16, 2)
    assert (taef2.in_channels, taef2.input_size, taef2.patch_size) == (32, 8, 1)
    assert {**vars(taef2), "in_channels": 4, "input_size": 16, "patch_size": 2} == vars(own)
    with torch.device("meta"):
        sit = sra2.SiT(taef2)
    assert sit.x_embedder(torch.empty(2, 32, 8, 8, device="meta")).shape[1] == 64   # T tokens


def test_stage1_cache_is_keyed_by_the_vae(tmp_path):
    """Own VAE and TAEF2 never share a stage-1 file; TAEF2's is keyed by the data, not by the
    own VAE's training knobs."""
    own, taef2 = (tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--vae", vae])
                  for vae in ("own", "taef2"))
    path = tiny_demo.stage1_path
    assert path(own, "d") != path(taef2, "d") and path(taef2, "d") != path(taef2, "e")
    before = path(own, "d"), path(taef2, "d")
    own.vae_steps = taef2.vae_steps = 7
    assert path(own, "d") != before[0] and path(taef2, "d") == before[1]


@needs_taef2
@pytest.mark.usefixtures("one_thread")
def test_taef2_stage1_caches_normalised_latents_of_images_and_mirrors(tmp_path):
    s = tiny_demo.parse_args([*TINY, "--vae", "taef2", "--taef2", str(TAEF2_DIR), "--cache",
                              str(tmp_path)])
    tiny_demo.check(s)
    images, _ = tiny_demo.synthetic_images(6)
    stage = tiny_demo.stage1(images, "d", s, torch.device("cpu"))
    assert stage.latents.shape == (2, 6, 32, 8, 8) and stage.std is None
    assert abs(stage.latents.mean()) < 0.01 and abs(stage.latents.std() - 1) < 0.01
    x = tiny_demo.to_float(torch.from_numpy(images))
    for flip, pixels in enumerate((x, x.flip(3))):           # the mirror images' own encodings
        z = (stage.vae.encode(pixels)[0] - stage.shift) * stage.scale
        assert torch.allclose(z, stage.latents[flip], atol=1e-2)      # stored in float16
    [cached] = tmp_path.glob("stage1-*.pt")
    assert cached.name.startswith("stage1-taef2-")
    again = tiny_demo.stage1(images, "d", s, torch.device("cpu"))     # from the cache
    assert torch.equal(again.latents, stage.latents) and again.std is None
    decoded = tiny_demo.decode(again, again.latents[0])                 # (6, 32, 32, 3) uint8
    assert decoded.shape == (6, 32, 32, 3) and decoded.dtype == torch.uint8
    mse = (decoded.float() - torch.from_numpy(images).float()).square().mean()
    assert 10 * math.log10(255 ** 2 / mse) > 20                        # a reconstruction


def test_cpu_estimate_of_taef2_counts_the_images_encoded():
    """TAEF2's stage 1 encodes each training image and its mirror image: the cpu preset's 10,000
    images at 2 ms each are 40 s (the rest as in the own VAE's estimate)."""
    args = tiny_demo.parse_args(["--preset", "cpu", "--vae", "taef2", "--batch-size", "4"])
    tiny_demo.check(args)
    unit = dict(sit=1e-3, vae=2e-3, inception=1e-2)
    assert demo_infra.estimate(args, unit, 2, False, False) == (
        "about 1m32s here (stage 1 40s, FID reference 10s, 2 runs 42s; from timed steps of each "
        "part)")


@pytest.mark.slow
@needs_taef2
@pytest.mark.usefixtures("one_thread")
def test_quick_demo_runs_with_taef2(tmp_path, monkeypatch):
    """--quick --vae taef2 end to end on a few synthetic images: SiT on 8x8x32 latents, samples
    decoded by TAEF2 to 32 px (the FID here is a stand-in: the images' mean), held-out losses, the
    stage-1 file of TAEF2."""
    seen = []
    monkeypatch.setattr(tiny_demo, "FIDMeter", lambda *args: lambda images: seen.append(
        images.shape) or images.float().mean().item())
    records = tiny_demo.main([*TINY, "--vae", "taef2", "--taef2", str(TAEF2_DIR), "--n-images",
                              "16", "--heldout-n", "12", "--evals", "1", "--heldout-evals", "1",
                              "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert seen == [(3, 32, 32, 3)] * 4                      # 2 runs: a checkpoint and the end
    for r in records.values():
        assert math.isfinite(r["heldout"][-1]["loss"]) and r["grids"][10].dtype == torch.uint8
    assert [p.name[:13] for p in (tmp_path / "cache").glob("stage1-*")] == ["stage1-taef2-"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["vae"] == "taef2" and "stage 1 stage1-taef2-" in results["data"]
    assert (tmp_path / "out" / "vae_reconstructions.png").is_file()


def test_reach_interpolates_between_checkpoints():
    steps = [100, 200, 300, 400]
    assert tiny_demo.reach(steps, [50, 40, 30, 20], 35) == (250, True)
    assert tiny_demo.reach(steps, [30, 25, 20, 10], 35) == (100, False)   # reached before the first
    assert tiny_demo.reach(steps, [50, 45, 44, 43], 40) == (None, True)
    # a dip, back up: the last crossing
    assert tiny_demo.reach(steps, [50, 30, 60, 20], 35) == (362.5, True)
    # ends above: no speed-up claimed
    assert tiny_demo.reach(steps, [50, 30, 20, 36], 35) == (None, True)


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(1e-4, 1e4), ratio=st.floats(1.0, 1e4), log=st.booleans())
@example(lo=176.9, ratio=214.7 / 176.9, log=True)     # a FID curve: a tick below 177 was missing
@example(lo=0.505, ratio=0.698 / 0.505, log=True)     # a held-out loss curve
def test_axis_ticks_enclose_the_data_so_every_gridline_is_labelled(lo, ratio, log):
    """The axis spans its first and last tick, so the lowest and highest points have a labelled
    gridline at or beyond them; ticks rise, and stay above 0 on a log axis."""
    hi = lo * ratio
    ticks = demo_infra.axis_ticks(lo, hi, log)
    assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) >= 2
    assert all(a < b for a, b in zip(ticks, ticks[1:])) and (ticks[0] > 0 or not log)
    assert len(ticks) <= 16                                            # readable, not a comb


def test_thick_lines_have_the_same_thickness_at_every_slope():
    """Measured across the line (mean over 100 columns or rows, away from the ends): a nearly flat,
    a shallow, a 38-degree and a steep line are all `width` thick (pillow's own wide line is 1
    pixel thick when nearly flat)."""
    for width in (2, 3):
        for (x0, y0), (x1, y1) in [((10, 100), (190, 101)), ((10, 100), (190, 110)),
                                   ((10, 10), (190, 150)), ((100, 10), (110, 190))]:
            image = Image.new("L", (200, 200), 255)
            demo_infra.thick_line(image, [(x0, y0), (x1, y1)], 0, width)
            pixels, angle = np.asarray(image) < 128, math.atan2(y1 - y0, x1 - x0)
            if abs(math.sin(angle)) < abs(math.cos(angle)):           # shallow: down the columns
                across = pixels[:, 50:150].sum() / 100 * abs(math.cos(angle))
            else:                                                      # steep: along the rows
                across = pixels[50:150, :].sum() / 100 * abs(math.sin(angle))
            assert abs(across - width) < 0.15, (width, (x0, y0), (x1, y1), across)


def test_cpu_estimate_names_each_part_and_grows_with_the_steps(tmp_path):
    args = tiny_demo.parse_args(["--preset", "cpu", "--model", "tiny", "--batch-size", "4",
                                 "--vae-width", "8", "--vae-batch", "4", "--cache", str(tmp_path)])
    tiny_demo.check(args)
    per_image = tiny_demo.time_per_image(args, torch.device("cpu"), uses_fid=False)
    assert per_image["sit"] > 0 and per_image["vae"] > 0 and per_image["inception"] == 0
    line = demo_infra.estimate(args, per_image, 4, have_stage1=False, have_reference=True)
    assert re.fullmatch(r"(note: a long run on a CPU: )?about \S+ here \(stage 1 \S+, 4 runs \S+; "
                        r"from timed steps of each part\)", line), line
    # The arithmetic, by hand: cpu preset, batch 4, 1 ms per image per training step, 2 ms per VAE
    # image, 10 ms per Inception image. A run: (1200 x 4 + (3 x 250 x 25 + 8 x 1000) / 3) x 1 ms
    # + 3 x 250 x 10 ms = 21.2 s; stage 1: 400 x 4 x 2 ms = 3.2 s; reference: 1000 x 10 ms = 10 s.
    unit = dict(sit=1e-3, vae=2e-3, inception=1e-2)
    assert demo_infra.estimate(args, unit, 2, False, False) == (
        "about 56s here (stage 1 3.2s, FID reference 10s, 2 runs 42s; from timed steps of each "
        "part)")
    args.steps *= 2                                                    # + 2 x 4800 x 1 ms
    assert demo_infra.estimate(args, unit, 2, True, True) == (
        "about 52s here (2 runs 52s; from timed steps of each part)")


def test_charts_and_grids_are_pngs(tmp_path):
    demo_infra.line_chart(tmp_path / "c.png", [("a", [1, 2, 3], [300, 100, 30]),
                                              ("b", [1, 2, 3], [310, 90, 25])],
                         "t", "x", "y", logy=True, note="note")
    with Image.open(tmp_path / "c.png") as image:
        assert image.size == (900, 560)
    grid = np.asarray(demo_infra.image_grid(np.full((3, 4, 5, 3), 7, np.uint8), ncol=2, pad=1))
    # 2 rows of 4 px, 2 cols of 5 px
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert (grid[1:5, 1:6] == 7).all() and (grid[6:10, 7:12] == 255).all()   # 4th cell empty


def test_legend_is_measured_so_no_label_is_cut_and_log_axes_say_so(tmp_path, monkeypatch):
    """A long label widens the picture (the plot keeps its width): its last columns stay white,
    where a fixed legend width would cut the text at the edge; a log axis is labelled so."""
    texts = []
    real_text = demo_infra.ImageDraw.ImageDraw.text
    monkeypatch.setattr(demo_infra.ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k:
                        texts.append(text) or real_text(self, xy, text, *a, **k))
    label = "baseline, mean of seeds 2, 3, 4, and a label longer than any legend in this repository"
    demo_infra.line_chart(tmp_path / "c.png", [(label, [1, 2, 3], [0.7, 0.6, 0.5]),
                                              ("b", [1, 2, 3], [0.71, 0.6, 0.52])],
                         "t", "x", "held-out loss", logy=True)
    with Image.open(tmp_path / "c.png") as image:
        pixels = np.asarray(image)
    assert pixels.shape[1] > 900 and (pixels[:, -6:] == 255).all()
    assert "held-out loss (log scale)" in texts and label in texts


def test_synthetic_data_is_deterministic_and_class_dependent():
    a, la = tiny_demo.synthetic_images(200, seed=5)
    b, lb = tiny_demo.synthetic_images(200, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and a.dtype == np.uint8
    means = np.stack([a[la == k].reshape(-1, 3).mean(0) for k in range(10) if (la == k).any()])
    assert np.ptp(means, axis=0).max() > 10                            # classes differ in colour


# ---------------------------------------------------------------- the held-out loss beside FID

def mean(values):
    values = list(values)
    return sum(values) / len(values)


def test_heldout_set_is_fixed_and_heldout_loss_is_the_training_denoise_term(tmp_path):
    """The protocol's held-out draws, the same every time: image i at t = (i mod 12 + 0.5) / 12,
    eps one N(0, I) draw from seed 20260 (every result in results/ is measured on them); the loss
    twice the same, equal to training_loss's denoising term on those draws, and the bands (4 grid
    points each) average to it."""
    s = tiny_demo.parse_args([*TINY, "--cache", str(tmp_path), "--heldout-n", "24"])
    tiny_demo.check(s)
    torch.manual_seed(0)
    stage = SimpleNamespace(vae=tiny_demo.VAE(8).eval(), shift=0.1, scale=2.0)
    held, again = (tiny_demo.heldout_set(s, stage, torch.device("cpu")) for _ in range(2))
    assert all(torch.equal(getattr(held, k), getattr(again, k)) for k in ("z", "y", "t", "eps"))
    assert len(held.t) == s.heldout_n == 24
    assert held.t.tolist() == [np.float32((i % 12 + 0.5) / 12) for i in range(24)]
    assert torch.equal(held.eps, torch.randn(24, 4, 16, 16,
                                             generator=torch.Generator().manual_seed(20_260)))
    model = sra2.create_sit("SiT-S/2", depth=2, hidden_size=64, num_heads=1, input_size=16,
                            num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))                         # not the zero init
    model.eval()
    first = tiny_demo.heldout_loss(model, held, batch=7)
    second = tiny_demo.heldout_loss(model, held)
    assert first == pytest.approx(second, rel=1e-6)
    assert second == tiny_demo.heldout_loss(model, held)
    denoise = sra2.training_loss(model, held.z, held.y, t=held.t, eps=held.eps)["denoise"].item()
    assert first["loss"] == pytest.approx(denoise, rel=1e-6) and first["loss"] > 0
    bands = mean(first[band] for band in tiny_demo.HELDOUT_BANDS)
    assert first["loss"] == pytest.approx(bands, rel=1e-6)


def test_heldout_loss_equals_the_closed_form_for_the_exact_gaussian_velocity():
    """z ~ N(mu, s^2), v_theta = E[eps - z | x_t] exactly: the loss per element is
    Var(eps - z | x_t) = 1 + s^2 - (t - (1 - t) s^2)^2 / ((1 - t)^2 s^2 + t^2), band by band,
    within 5 standard errors (each element's squared error is s_t^2 times a chi-square(1))."""
    mu, s, n = 0.3, 0.8, 12 * 2000
    g = torch.Generator().manual_seed(0)
    t = ((torch.arange(12, dtype=torch.float64) + 0.5) / 12)[torch.arange(n) % 12]
    held = SimpleNamespace(z=mu + s * torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64),
                           eps=torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64),
                           y=torch.zeros(n, dtype=torch.long), t=t)
    got = tiny_demo.heldout_loss(gaussian_velocity(mu, s), held)
    conditional_var = 1 + s ** 2 - (t - (1 - t) * s ** 2) ** 2 / ((1 - t) ** 2 * s ** 2 + t ** 2)
    for band, (lo, hi) in tiny_demo.HELDOUT_BANDS.items():
        inside = conditional_var[(t >= lo) & (t < hi)]
        stderr = math.sqrt(2 * inside.square().mean().item() / (4 * len(inside)))
        assert abs(got[band] - inside.mean().item()) < 5 * stderr, band


def test_heldout_images_come_from_the_test_split(tmp_path):
    folder, train, _ = write_cifar_folder(tmp_path / "data")
    s = tiny_demo.parse_args([*TINY, "--data", str(folder), "--heldout-n", "12"])
    images, labels, _ = tiny_demo.load_data(s, "test")
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    assert np.array_equal(images, raw[b"data"][:12].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels.tolist() == raw[b"labels"][:12]
    assert not any((train == im).all((1, 2, 3)).any() for im in images)
    with pytest.raises(tiny_demo.DemoError, match="--heldout-n 13: the test split has 12 images"):
        tiny_demo.load_data(tiny_demo.parse_args([*TINY, "--data", str(folder), "--heldout-n",
                                                  "13"]), "test")


@pytest.mark.slow
def test_without_fid_no_inception_is_loaded_and_the_heldout_loss_is_recorded(tmp_path, monkeypatch):
    """--evals 0 --final-fid-n 0 (the study's runs): no FID anywhere, the held-out loss at each of
    its checkpoints for each run, and the table says what it has."""
    def no_fid(*args):
        raise AssertionError("FIDMeter built although no FID was asked for")
    monkeypatch.setattr(tiny_demo, "FIDMeter", no_fid)
    records = tiny_demo.main([*TINY, "--evals", "0", "--final-fid-n", "0", "--heldout-evals", "2",
                              "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    for r in records.values():
        assert [e["step"] for e in r["heldout"]] == [5, 10]
        assert r["evals"] == [] and r["final_fid"] is None
        assert all(math.isfinite(e[k])
                   for e in r["heldout"] for k in ("loss", "low", "middle", "high"))
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "held-out loss" in table and "SRA 2 - baseline" in table and "speed-up" not in table
    assert (tmp_path / "out" / "heldout_loss.png").is_file()


# ---------------------------------------------------------------- the whole pipeline

def run_demo(tmp_path, *extra):
    return tiny_demo.main([*TINY, "--out", str(tmp_path / "out"), "--cache",
                           str(tmp_path / "cache"), "--inception", str(INCEPTION), *extra])


@pytest.mark.slow
@needs_shared(INCEPTION)
def test_whole_pipeline_writes_table_pngs_and_finite_fids(tmp_path):
    records = run_demo(tmp_path)
    out = tmp_path / "out"
    table = (out / "table.txt").read_text()
    assert "Table 2 in miniature" in table and "QUICK MODE" in table and "SYNTHETIC" in table
    assert "speed-up" in table
    pngs = ["fid_vs_steps.png", "fid_vs_time.png", "loss_curves.png", "samples_final.png",
            "vae_reconstructions.png"] + [f"samples_step{s:06d}.png" for s in (2, 4, 6, 8, 10)]
    for name in pngs:
        # a real PNG, not an empty file
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 and results["machine"]["commit"]
    for run in results["runs"]:
        # 5 checkpoints, last = final step
        assert [e["step"] for e in run["evals"]] == [2, 4, 6, 8, 10]
        assert all(math.isfinite(e["fid"]) and e["fid"] > 0 for e in run["evals"])
        assert math.isfinite(run["final_fid"]) and run["wall"] > 0
    base, sra = records["baseline", 0], records["sra2", 0]
    assert all(e["align"] == 0 for e in base["log"]) and all(e["align"] > 0 for e in sra["log"])
    # Matched grids: same noise and labels, so the samples at init-equal weights would be equal;
    # here the alignment changed the EMA weights, so the samples differ.
    assert base["grids"][10].shape == sra["grids"][10].shape == (3, 32, 32, 3)
    base_ema = torch.load(out / "ckpt" / "baseline.pt", weights_only=True)["ema"]
    assert not torch.equal(base_ema["blocks.0.attn.qkv.weight"],
                           torch.load(out / "ckpt" / "sra2.pt", weights_only=True)["ema"][
                               "blocks.0.attn.qkv.weight"])
    assert not torch.equal(base["grids"][10], sra["grids"][10])
    # The checkpoint loads without unpickling code and holds everything a resume needs.
    ckpt = torch.load(out / "ckpt" / "sra2.pt", weights_only=True)
    assert ckpt["step"] == 10
    assert set(ckpt) >= {"model", "ema", "projector", "optimizer", "step", "settings", "record"}
    assert ckpt["record"]["final_fid"] == sra["final_fid"]
    assert torch.equal(ckpt["record"]["grids"][10], sra["grids"][10])
    model = sra2.create_sit("SiT-S/2", depth=4, hidden_size=128, num_heads=2, input_size=16,
                            num_classes=10)
    model.load_state_dict(ckpt["ema"])                                 # P is separate: a plain SiT
    # no temporary file left behind
    assert not list((out / "ckpt").glob("*.tmp*"))


@pytest.mark.slow
def test_clipped_steps_are_counted_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    tiny_clip = lambda clip: tiny_demo.main([*TINY, "--grad-clip", clip, "--out",
                                             str(tmp_path / clip), "--cache",
                                             str(tmp_path / "cache")])
    every, never = tiny_clip("1e-9"), tiny_clip("1e9")                 # every step clipped / none
    assert every["baseline", 0]["clipped"] == every["sra2", 0]["clipped"] == 10
    assert never["baseline", 0]["clipped"] == never["sra2", 0]["clipped"] == 0
    assert "baseline 10, SRA 2 10 of 10 steps" in (tmp_path / "1e-9" / "table.txt").read_text()


@pytest.mark.slow
def test_ablation_prints_table_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    records = tiny_demo.main([*TINY, "--ablate", "--steps", "4", "--evals", "1", "--out",
                              str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "Table 1 in miniature" in table
    for row in ["vanilla SiT", "align depth", "[0, 0.5]", "[0.5, 1]", "cosine", "L1", "L2", "0.1",
                "2 layers"]:
        assert row in table, row
    # the default SRA 2 run is shared
    assert len(records) == 11
    assert {r["settings"] for r in records.values()} >= {
        "vanilla", "block 3, smooth_l1, lambda 1, t in [0, 1], 5-layer MLP of width 2D",
        "block 2, cosine, lambda 1, t in [0, 1], 5-layer MLP of width 2D",
        "block 2, smooth_l1, lambda 1, t in [0.5, 1], 5-layer MLP of width 2D"}
    assert all(len(r["evals"]) == 1 for r in records.values())         # FID at the end only


@pytest.mark.slow
def test_two_seeds_give_a_mean_row_and_speedup(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    tiny_demo.main([*TINY, "--seed", "0,1", "--steps", "6", "--evals", "3", "--out",
                    str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "(mean)" in table and "seed 1" in table and "seed mean" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["step_fraction_to_baseline_fid"]) == {"0", "1", "mean"}
    assert len(results["runs"]) == 4


@pytest.mark.usefixtures("one_thread")                            # small ops: see one_thread
def test_both_runs_see_the_same_init_batches_and_noise(tmp_path, monkeypatch):
    """Baseline and SRA 2 differ only by the projector: same SiT init, same batches, same t, eps and
    label dropout. With lambda = 0 the alignment cannot move the SiT, so both end identical. Step
    k of each trains on the images and flips of batch_indices(k - 1) and on step_noise's t, eps
    and label drops at the model's rate, the paper's 0.1."""
    s = tiny_demo.parse_args([*TINY, "--evals", "1", "--heldout-evals", "0", "--ckpt-minutes", "0"])
    tiny_demo.check(s)
    stage = SimpleNamespace(latents=torch.randn(2, 32, 4, 16, 16), heldout=None)
    labels = torch.randint(0, 10, (32,))
    # EMA state at each evaluation
    ema_weights = []
    monkeypatch.setattr(tiny_demo, "generate", lambda ema, stage, n, *a, **k: (
        ema_weights.append({k: v.clone() for k, v in ema.state_dict().items()}),
        torch.zeros(n, 32, 32, 3, dtype=torch.uint8))[1])
    real_loss, calls = sra2.training_loss, []
    monkeypatch.setattr(sra2, "training_loss", lambda model, z, y, proj, **kw: (
        calls.append((z, y, kw["t"], kw["eps"], kw["drop_labels"])),
        real_loss(model, z, y, proj, **kw))[1])
    for run in (tiny_demo.make_run(s, "baseline", "b", False),
                tiny_demo.make_run(s, "sra2", "a", True, lam=0.0)):
        # each run must reseed by itself
        torch.manual_seed(123)
        tiny_demo.train_run(run, stage, labels, s, torch.device("cpu"), lambda images: 1.0,
                            tmp_path)
    # [1], [3]: the final FID's calls
    baseline, aligned = ema_weights[0], ema_weights[2]
    assert all(torch.allclose(baseline[k], aligned[k], atol=1e-6) for k in baseline)
    init = tiny_demo.build(s, run, torch.device("cpu"))[0].state_dict()
    assert not torch.equal(baseline["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert len(calls) == 2 * s.steps == 20
    for k, (z, y, t, eps, drop) in enumerate(calls[:10], start=1):
        idx, flip = tiny_demo.batch_indices(k - 1, 32, 8, s.seed)
        assert torch.equal(z, stage.latents[flip, idx]) and torch.equal(y, labels[idx])
        drawn = tiny_demo.step_noise(torch.Generator(), s.seed, k, (8, 4, 16, 16), 0.1)
        assert all(torch.equal(a, b) for a, b in zip((t, eps, drop), drawn))
    assert all(torch.equal(a, b) for pair in zip(calls[:10], calls[10:]) for a, b in zip(*pair))


@pytest.mark.usefixtures("one_thread")                            # small ops: see one_thread
def test_demo_ema_after_k_steps_is_the_closed_form_of_the_warm_up(tmp_path, monkeypatch):
    """The EMA that the held-out loss and FID are measured on: step k (from 1) updates it with
    decay min(cap, (1 + k) / (10 + k)). An EMA started at 0 that follows a model held still
    (lr 0) is at (1 - prod_k decay_k) times the model after K steps: with cap 0.5 and K = 10,
    prod = 2/11 x 3/12 x ... x 8/17 x 0.5^3 = 8! 10! / 17! / 8 (k = 8 reaches the cap). The
    product is 5e-5, too small to show the cap in float32 weights, so the decays are also
    recorded and compared with the rule step by step."""
    s = tiny_demo.parse_args([*TINY, "--evals", "1", "--final-fid-n", "0", "--heldout-evals", "0",
                              "--ckpt-minutes", "0", "--ema-decay", "0.5"])
    tiny_demo.check(s)
    s.lr = 0.0                                                         # the model stays at init
    stage = SimpleNamespace(latents=torch.randn(2, 32, 4, 16, 16), heldout=None)
    real_create_ema, real_update_ema, seen, decays = sra2.create_ema, sra2.update_ema, [], []
    monkeypatch.setattr(sra2, "create_ema", lambda model: real_create_ema(model).requires_grad_(
        False).apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)]))
    monkeypatch.setattr(sra2, "update_ema", lambda ema, model, decay: (
        decays.append(decay), real_update_ema(ema, model, decay)))
    monkeypatch.setattr(tiny_demo, "generate", lambda ema, stage, n, *a, **k: (
        seen.append((ema.training, {k: v.clone() for k, v in ema.state_dict().items()})),
        torch.zeros(n, 32, 32, 3, dtype=torch.uint8))[1])
    run = tiny_demo.make_run(s, "baseline", "b", False)
    tiny_demo.train_run(run, stage, torch.randint(0, 10, (32,)), s, torch.device("cpu"),
                        lambda images: 1.0, tmp_path)
    assert decays == [min(0.5, (1 + k) / (10 + k)) for k in range(1, 11)]
    weight = 1 - math.factorial(8) * math.factorial(10) / math.factorial(17) / 8
    model = tiny_demo.build(s, run, torch.device("cpu"))[0].state_dict()
    [(training, ema)] = seen                                   # eval mode: no label drops
    assert ema.keys() == model.keys() and not training
    for name, value in model.items():
        torch.testing.assert_close(ema[name], weight * value, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("one_thread")                            # small ops: see one_thread
def test_sample_and_control_targets_on_the_same_draws(tmp_path, monkeypatch):
    """--target sample: the projector is pulled to z + std * n, n ~ N(0, I) fresh each step;
    --target other (the control): to the latent of the image before it in the batch. The SiT sees
    the same z, t, eps and dropped labels as with the posterior mean."""
    s = tiny_demo.parse_args([*TINY, "--steps", "3", "--heldout-evals", "0", "--evals", "1"])
    tiny_demo.check(s)
    stage = SimpleNamespace(latents=torch.randn(2, 32, 4, 16, 16),
                            std=torch.full((2, 32, 4, 16, 16), 0.5), heldout=None)
    real_loss, calls = sra2.training_loss, {"mean": [], "sample": [], "other": []}
    monkeypatch.setattr(tiny_demo, "generate", lambda model, stage, n, *a, **k: torch.zeros(
        n, 32, 32, 3, dtype=torch.uint8))
    for target in calls:
        def spy(model, z, y, proj, **kw):
            calls[target].append(dict(z=z, t=kw["t"], eps=kw["eps"], drop=kw["drop_labels"],
                                      target=kw["target"]))
            return real_loss(model, z, y, proj, **kw)
        monkeypatch.setattr(sra2, "training_loss", spy)
        s.target = target
        tiny_demo.train_run(tiny_demo.make_run(s, "sra2", target, True), stage,
                            torch.randint(0, 10, (32,)), s, torch.device("cpu"),
                            lambda images: 1.0, tmp_path / target)
    assert len(calls["mean"]) == len(calls["sample"]) == len(calls["other"]) == 3
    for mean, sample, other in zip(calls["mean"], calls["sample"], calls["other"]):
        for key in ("z", "t", "eps", "drop"):
            assert torch.equal(mean[key], sample[key]) and torch.equal(mean[key], other[key])
        assert torch.equal(mean["target"], sra2.patchify(mean["z"], 2))
        z_before = torch.cat([mean["z"][-1:], mean["z"][:-1]])         # image i - 1's latent
        assert torch.equal(other["target"], sra2.patchify(z_before, 2))
        noise = (sample["target"] - mean["target"]) / 0.5               # n ~ N(0, I), 32K values
        assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03
    first, second = (c["target"] - m["target"] for c, m in zip(calls["sample"][:2], calls["mean"]))
    assert not torch.allclose(first, second)                             # fresh noise each step


def test_a_checkpoint_from_before_the_vae_flag_resumes_as_the_own_vae(tmp_path):
    """Checkpoints written before --vae existed have no "vae" setting: they were the own VAE's,
    so they resume under --vae own and are refused under --vae taef2."""
    s = tiny_demo.parse_args([*TINY, "--model", "24x64"])
    tiny_demo.check(s)
    run = tiny_demo.make_run(s, "sra2", "SRA 2", True)
    settings = {k: v for k, v in vars(s).items() if k != "vae"}
    path = tmp_path / "sra2.pt"
    torch.save(dict(format=demo_infra.CKPT_FORMAT, settings=settings, run=vars(run),
                    record=dict(seed=s.seed), step=3), path)
    assert demo_infra.load_checkpoint(path, s, run)["step"] == 3
    s.vae = "taef2"
    with pytest.raises(demo_infra.DemoError, match="--vae"):
        demo_infra.load_checkpoint(path, s, run)


def test_depth_sweep_models_align_at_the_papers_fraction_of_depth():
    """BLOCKSxWIDTH: head dim 64 as in SiT; aligned block 1/6 of the depth up to 12 blocks (2 of
    12, the paper's S and B) and 1/3 from 24 on (8 of 24, its L), at least 1."""
    expected = {"6x64": 1, "12x64": 2, "24x64": 8, "3x128": 1, "6x128": 1, "12x128": 2}
    assert {name for name in tiny_demo.DEMO_MODELS if "x" in name} == set(expected)
    for name, block in expected.items():
        s = tiny_demo.parse_args([*TINY, "--model", name])
        tiny_demo.check(s)
        config, (depth, width) = tiny_demo.model_config(s), map(int, name.split("x"))
        assert (config.depth, config.hidden_size, config.num_heads) == (depth, width, width // 64)
        assert config.align_depth == s.align_depth == block
    s = tiny_demo.parse_args([*TINY, "--model", "24x64", "--align-depth", "4"])
    tiny_demo.check(s)
    assert s.align_depth == 4


def test_auto_precision_is_resolved_before_the_run_starts(monkeypatch, tmp_path):
    """--precision auto becomes the device's default before data, checkpoints or records see it."""
    def stop(*a):
        raise RuntimeError("stopped at the data")
    for default in ("bf16", "fp32"):
        args = tiny_demo.parse_args(TINY)
        assert args.precision == "auto"
        monkeypatch.setattr(sra2, "default_precision", lambda device: default)
        monkeypatch.setattr(tiny_demo, "rank0_first", stop)
        with pytest.raises(RuntimeError, match="stopped at the data"):
            tiny_demo.experiment(args, torch.device("cpu"), tmp_path, "cpu")
        assert args.precision == default


def test_default_precision_is_bf16_only_where_it_is_native(monkeypatch):
    """bf16 autocast on CUDA, and on a CPU only with native bf16 (AVX512-BF16 or AMX): elsewhere
    the CPU emulates it, slower than fp32."""
    assert sra2.default_precision("cuda") == "bf16" and sra2.default_precision("mps") == "fp32"
    for avx512_bf16, amx, expected in [(False, False, "fp32"), (True, False, "bf16"),
                                       (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert sra2.default_precision("cpu") == expected


def test_a_few_bf16_steps_stay_close_to_fp32():
    """Five AdamW steps of SiT + P under bf16 autocast on the CPU against fp32, from one init on
    one batch: the losses and the weights stay close (bf16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    z, y = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    t, eps = torch.rand(16), torch.randn(16, 4, 8, 8)
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = sra2.SiT(sra2.SiTConfig(input_size=8, hidden_size=64, depth=3, num_heads=1,
                                        num_classes=10, align_depth=1))
        projector = sra2.make_projector(model)
        opt = torch.optim.AdamW([*model.parameters(), *projector.parameters()], lr=1e-3)
        losses = []
        for _ in range(5):
            with sra2.autocast("cpu", enabled=precision == "bf16"):
                parts = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
            opt.zero_grad()
            parts["loss"].backward()
            opt.step()
            losses.append([parts["denoise"].item(), parts["align"].item()])
        runs[precision] = torch.tensor(losses), torch.nn.utils.parameters_to_vector(
            model.parameters()).detach()
    (loss32, w32), (loss16, w16) = runs["fp32"], runs["bf16"]
    assert torch.allclose(loss16, loss32, rtol=0.02), (loss16, loss32)
    assert (w16 - w32).norm() < 0.01 * w32.norm()
    assert not torch.equal(loss16, loss32)                             # bf16 did run


@pytest.mark.usefixtures("one_thread")                            # small ops: see one_thread
def test_nonfinite_loss_stops_with_the_step(tmp_path, monkeypatch):
    s = tiny_demo.parse_args([*TINY, "--heldout-evals", "0"])
    tiny_demo.check(s)
    real_loss, calls = sra2.training_loss, []

    def poisoned(*args, **kwargs):                                     # NaN from the 4th step on
        calls.append(1)
        parts = real_loss(*args, **kwargs)
        return {**parts, "loss": parts["loss"] * float("nan")} if len(calls) >= 4 else parts
    monkeypatch.setattr(sra2, "training_loss", poisoned)
    monkeypatch.setattr(tiny_demo, "generate", lambda model, stage, n, *a, **k: torch.zeros(
        n, 32, 32, 3, dtype=torch.uint8))
    stage = SimpleNamespace(latents=torch.randn(2, 32, 4, 16, 16), heldout=None)
    with pytest.raises(tiny_demo.DemoError, match="loss is nan at step 4"):
        tiny_demo.train_run(tiny_demo.make_run(s, "baseline", "b", False), stage,
                            torch.randint(0, 10, (32,)), s, torch.device("cpu"),
                            lambda images: 1.0, tmp_path)


def test_readme_results_come_from_the_records_in_results():
    """Every table row and every number of the README's Results section is in results/study.md
    or results/depth.md, which results/study.py and results/depth.py write from the per-run
    records in results/study/ and results/depth/; each record names its command, commit and
    machine, and both files are what those records give today."""
    text = (HERE / "README.md").read_text().split("\n## Results", 1)[1].split("\n## ", 1)[0]
    depth_py = _depth()
    depth_records = depth_py.load_records()
    assert depth_records and all({"command", "commit", "machine"} <= set(r)
                                 for r in depth_records.values())
    depth = (HERE / "results" / "depth.md").read_text()
    assert depth_py.text(depth_records) == depth
    assert "\n".join(depth_py.readme_rows(depth_records)) in text     # the README's depth table
    study = (HERE / "results" / "study.md").read_text()
    rows = [line for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    assert rows and all(row in study + depth for row in rows)
    numbers = re.findall(r"[+-]?\d+\.\d+%?", re.sub(r"\|.*", "", text))
    assert numbers and all(n in study + depth for n in numbers), [
        n for n in numbers if n not in study + depth]
    study_py = _study()
    records = study_py.load_records()
    assert records and all({"command", "commit", "machine"} <= set(r) for r in records.values())
    assert study_py.study_text(records) == study


# ---------------------------------------------------------------- resume

def file_states(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*")
            if p.is_file() and p.name != "log.txt"}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(reference_run):
    """SIGKILL in the middle of writing SRA 2's step-9 checkpoint (the baseline already finished):
    the step-6 file survives intact, --resume reuses the baseline's record, continues SRA 2 from
    step 6, and both end with the uninterrupted run's weights, optimizer state and losses, bit
    for bit on a CPU (batches and noise are functions of (seed, step), see step_noise)."""
    root, records = reference_run
    killed = run_child(demo_args(root, "killed"), env=dict(KILL_RUN="sra2", KILL_STEP="9"))
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, err
    ckpt = root / "killed" / "ckpt"
    assert torch.load(ckpt / "sra2.pt", weights_only=True)["step"] == 6       # the last whole save
    assert len(list(ckpt.glob(".sra2.pt.*.tmp*"))) == 1                        # the torn one, aside
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_demo, "FIDMeter", FakeFID)
        resumed = tiny_demo.main(demo_args(root, "killed", "--resume"))
    log = (root / "killed" / "log.txt").read_text()
    assert "finished; its record is reused" in log and "resumed at step 6" in log
    for name in ("baseline", "sra2"):
        assert_same_checkpoint(root / "out" / "ckpt" / f"{name}.pt", ckpt / f"{name}.pt")
        a, b = records[name, 0], resumed[name, 0]
        losses = lambda record: [(e["step"], e["loss"], e["align"]) for e in record["log"]]
        assert losses(a) == losses(b)
        assert [e["fid"] for e in a["evals"]] == [e["fid"] for e in b["evals"]]
        assert a["final_fid"] == b["final_fid"]
        assert torch.equal(a["final_grid"], b["final_grid"])


@pytest.mark.slow
@pytest.mark.parametrize("damage, expected", [
    ("garbage", "is not a readable checkpoint"),
    ("truncated", "is not a readable checkpoint"),
    ("code", "is not a readable checkpoint (UnpicklingError"),
    ("other run", 'is from another run (the run: "sra2" there, "baseline" now)'),
    ("not ours", "is not a tiny_demo/2 checkpoint"),
])
def test_resume_from_a_bad_checkpoint_is_one_line_and_changes_nothing(reference_run, tmp_path,
                                                                      capsys, damage, expected):
    root, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    good = (out / "ckpt" / "baseline.pt").read_bytes()
    bad = {"garbage": b"\x00not a checkpoint" * 10, "truncated": good[: len(good) // 2],
           "other run": (out / "ckpt" / "sra2.pt").read_bytes()}.get(damage)
    # a pickled class: weights_only refuses it
    if damage == "code":
        torch.save({"format": "tiny_demo/2", "x": argparse.Namespace(cmd="rm -rf /")},
                   out / "ckpt" / "baseline.pt")
    elif damage == "not ours":
        torch.save({"model": {}}, out / "ckpt" / "baseline.pt")
    else:
        (out / "ckpt" / "baseline.pt").write_bytes(bad)
    before = file_states(out)
    line = error_line(capsys, [*demo_args(tmp_path, "out"), "--resume"])
    assert expected in line and "baseline.pt" in line and "nothing was changed" in line, line
    # nothing written, nothing lost
    assert file_states(out) == before


@pytest.mark.slow
def test_study_reads_the_records_the_demo_writes(reference_run, tmp_path):
    """results/study.py's record() on a results.json that tiny_demo.report wrote: a confirmation
    pair (both runs) and a screen run (one), each with its command, commit and machine."""
    root, _ = reference_run
    study = _study()
    for job in (study.CONFIRM[0], study.QUEUE[0]):
        (tmp_path / job).mkdir()
        shutil.copy(root / "out" / "results.json", tmp_path / job / "results.json")
        made = study.record(job, tmp_path)
        assert {"command", "commit", "machine"} <= set(made) and "tiny_demo.py" in made["command"]
    assert set(study.record(study.CONFIRM[0], tmp_path)["runs"]) == {"baseline", "sra2"}
    assert made["settings"]["precision"] == "fp32"                            # recorded
    (tmp_path / study.PRESET).mkdir()
    shutil.copy(root / "out" / "results.json", tmp_path / study.PRESET / "results.json")
    preset = study.record(study.PRESET, tmp_path)                    # every run of every seed
    assert set(preset["runs"]) == {"baseline-s0", "sra2-s0"} and preset["precision"] == "fp32"
    assert study.preset_lines(preset)[3].startswith(f"`{preset['command']}` took ")


def test_the_cpu_preset_time_stated_is_the_recorded_one():
    """tiny_demo.py's docstring and --help and the README give the cpu preset's time as
    `python results/study.py run preset-cpu` recorded it (results/study/preset-cpu.json)."""
    study = _study()
    record = study.load_records()[study.PRESET]
    said = f"about {study.preset_minutes(record)} min"
    readme = " ".join((HERE / "README.md").read_text().split())
    assert said in tiny_demo.__doc__ and said in tiny_demo.PRESET_HELP
    assert readme.count(said) == 2 and "run preset-cpu" in readme
    assert record["command"].startswith("python tiny_demo.py --preset cpu --out ")


def test_study_times_the_cpu_preset_as_shipped(tmp_path):
    """`results/study.py run preset-cpu` is `tiny_demo.py --preset cpu` with nothing changed but
    where it writes (its own seeds and threads, an empty cache of its own); its table reads the
    wall time in minutes (rounded as --help and the README state it) and each run's last
    held-out loss and FIDs."""
    study = _study()
    argv = study.command(study.PRESET, "data", "work", threads=1)
    assert argv[:4] == ["python", "tiny_demo.py", "--preset", "cpu"] and "--threads" not in argv
    assert argv[argv.index("--cache") + 1] == "work/preset-cpu-cache"
    s = tiny_demo.parse_args(argv[2:])
    tiny_demo.check(s)
    assert (s.model, s.steps, s.seeds, s.threads, s.lam, s.precision) == (
        "small", 1200, [0, 1], 2, 1.0, "auto")                     # auto: bf16 on native-bf16 CPUs
    run = lambda loss, fids: dict(train_seconds=1000.4, heldout=[dict(loss=0.6), dict(loss=loss)],
                                  fid=[dict(step=s, fid=f) for s, f in zip((400, 800, 1200), fids)])
    r = dict(command="python tiny_demo.py --preset cpu", card="cpu (2 cores, 2 threads)",
             machine=dict(processor="x86_64", torch="2.13.0+cpu"), precision="bf16", commit="abc",
             total_seconds=3040.0, runs={"baseline-s0": run(0.55, (250, 200, 181.26)),
                                         "sra2-s0": run(0.5512, (240, 190, 180.0)),
                                         "baseline-s1": run(0.5, (250, 200, 179.0)),
                                         "sra2-s1": run(0.49, (240, 190, 170.0))})
    lines = study.preset_lines(r)
    assert study.preset_minutes(r) == 51 and "took 50.7 min (51 min, rounded)" in lines[3]
    assert lines[5] == "| run | train time | held-out loss at the last step | FID-250 at steps " \
                       "400 / 800 / 1200 |"
    assert lines[-6:-4] == ["| baseline-s0 | 1000 s | 0.5500 | 250.0 / 200.0 / 181.3 |",
                            "| sra2-s0 | 1000 s | 0.5512 | 240.0 / 190.0 / 180.0 |"]
    assert lines[-1] == ("SRA 2's held-out gap: seed 0 +0.22%, seed 1 -2.00% (mean -0.89%); "
                         "FID-250 at the last step, mean of the seeds: baseline 180.1, SRA 2 175.0.")
    del r["runs"]["sra2-s1"]                                      # seed 1 unfinished: seed 0 alone
    assert study.preset_lines(r)[-1].startswith("SRA 2's held-out gap: seed 0 +0.22% (mean +0.22%)")
    (tmp_path / study.PRESET).mkdir()                    # timed alone, from scratch, or refused
    for argv in (["run", study.PRESET, "sra-s0"], ["run", study.PRESET, "--work", str(tmp_path)]):
        with pytest.raises(SystemExit, match="timed alone and from an empty cache"):
            study.main(argv)


def test_depth_study_commands_are_the_protocol():
    """results/depth.py: every job is tiny_demo.py at the screen protocol in fp32, the control
    aligned to another image's latent at the paper's block."""
    depth = _depth()
    assert len(depth.QUEUE) == len(set(depth.QUEUE)) == 6 * 4 * 2 + 3 * 2 + 3 * 3 + 3 + 3
    argv = depth.command("24x64-ctl8-s1", "data", "work")[2:]
    s = tiny_demo.parse_args(argv)
    tiny_demo.check(s)
    assert (s.model, s.steps, s.batch_size, s.heldout_evals, s.evals, s.precision, s.target,
            s.align_depth, s.seeds, s.runs) == ("24x64", 800, 64, 8, 0, "fp32", "other", 8, [1],
                                                ["sra2"])
    s = tiny_demo.parse_args(depth.command("24x64-b4-s0", "data", "work")[2:])
    tiny_demo.check(s)
    assert (s.target, s.align_depth, s.seeds) == ("mean", 4, [0])
    s = tiny_demo.parse_args(depth.command("24x64-taef2-ctl8-s1", "data", "work")[2:])
    tiny_demo.check(s)
    assert (s.vae, s.model, s.target, s.align_depth, s.seeds) == ("taef2", "24x64", "other", 8, [1])
    assert tiny_demo.parse_args(depth.command("24x64-ctl8-s1")[2:]).vae == "own"
    fresh = tiny_demo.parse_args(depth.command("24x64-b8-s2")[2:])      # FID only on fresh seeds
    assert (fresh.evals, s.evals, fresh.seed, fresh.steps) == (3, 0, "2", 800)
    long = tiny_demo.parse_args(depth.command("24x64-5k-ctl8-s0")[2:])    # the long run
    tiny_demo.check(long)
    assert (long.steps, long.heldout_evals, long.evals, long.target, long.align_depth, long.vae,
            long.model, long.seeds) == (5000, 10, 0, "other", 8, "own", "24x64", [0])


def test_depth_study_reads_a_gap_only_between_runs_on_the_same_stage_1():
    """Stage 1 is not bit-reproducible across machines: a run whose record names other latents
    than its baseline's (file, shift, scale) is refused, whatever the model or seed."""
    depth = _depth()
    a, b = "stage 1 stage1-x.pt, latent shift -0.150324", "stage 1 stage1-x.pt, latent shift -0.150325"
    records = {"12x64-base-s0": dict(data=a), "12x64-b2-s0": dict(data=a),
               "12x64-ctl2-s0": dict(data=b), "12x64-base-s1": dict(data=b),
               "12x64-b2-s1": dict(data=b), "6x64-b1-s1": dict(data=a),     # no baseline: unread
               "12x64-taef2-base-s0": dict(data=b), "12x64-taef2-b2-s0": dict(data=b)}
    assert depth.unpaired(records) == ["12x64-ctl2-s0"]
    assert depth.unpaired(depth.load_records()) == []                       # the recorded runs
    assert [j for j in depth.QUEUE if j.startswith("24x64-")][:3] == [
        "24x64-base-s0", "24x64-b8-s0", "24x64-ctl8-s0"]


def test_records_name_the_cpu_by_family_and_model(tmp_path, monkeypatch):
    """Two CPUs named "AMD EPYC" can be Zen 3 or Zen 4: a record names family, model and bf16."""
    info = "processor\t: {}\ncpu family\t: 25\nmodel\t\t: {}\nmodel name\t: AMD EPYC\n"
    (tmp_path / "cpuinfo").write_text(info.format(0, 17) + "\n" + info.format(1, 1))
    monkeypatch.setattr(sra2, "default_precision", lambda device: "bf16")
    assert demo_infra.cpu_name(tmp_path / "cpuinfo") == "AMD EPYC (family 25, model 17, native bf16)"
    monkeypatch.setattr(sra2, "default_precision", lambda device: "fp32")
    assert demo_infra.cpu_name(tmp_path / "cpuinfo") == "AMD EPYC (family 25, model 17)"
    assert demo_infra.cpu_name(tmp_path / "missing") == ""


def test_depth_study_fresh_seeds_read_fid_and_speed_up_as_the_demo_does():
    """Baseline FIDs 200/180/170 at steps 266/533/800; SRA 2 reaches 170 between 533 (172) and
    800 (165), at 533 + 267 * 2/7 = 609.3: 800/609.3 = 1.31x; the control ends above: never."""
    depth = _depth()
    make = lambda loss, fids: dict(heldout=[dict(step=800, loss=loss)], data="d", fid=[
        dict(step=s, fid=f) for s, f in zip((266, 533, 800), fids)])
    records = {"24x64-base-s2": make(0.5, [200, 180, 170]), "24x64-b8-s2": make(0.49, [195, 172, 165]),
               "24x64-ctl8-s2": make(0.51, [199, 185, 171]), "24x64-b8-s0": make(0.4, [])}
    rows = depth.fresh_rows(records)
    assert rows[0].startswith("| seed | run | held-out gap, step 800 | FID-250 at steps 266 / 533 / 800")
    assert rows[2:] == ["| 2 | baseline | - | 200.0 / 180.0 / 170.0 | - |",
                        "| 2 | SRA 2, block 8 | -2.00% | 195.0 / 172.0 / 165.0 | 1.31x |",
                        "| 2 | control, block 8 | +2.00% | 199.0 / 185.0 / 171.0 | never |"]
    # Seed 3 completes a second triple, seed 4 only its baseline: means over seeds 2 and 3. SRA 2's
    # mean curve 205/183.5/175 reaches the mean baseline's 180 at 533 + 267 * 3.5/8.5 = 642.9.
    records.update({"24x64-base-s3": make(0.5, [220, 200, 190]),
                    "24x64-b8-s3": make(0.48, [215, 195, 185]),
                    "24x64-ctl8-s3": make(0.5, [221, 201, 189]),
                    "24x64-base-s4": make(0.5, [230, 210, 200])})
    assert depth.fresh_rows(records)[8:] == [
        "| 4 | baseline | - | 230.0 / 210.0 / 200.0 | - |",
        "| mean of 2, 3 | baseline | - | 210.0 / 190.0 / 180.0 | - |",
        "| mean of 2, 3 | SRA 2, block 8 | -3.00% | 205.0 / 183.5 / 175.0 | 1.24x |",
        "| mean of 2, 3 | control, block 8 | +1.00% | 210.0 / 193.0 / 180.0 | 1.00x |"]


def test_depth_study_compares_at_equal_cpu_time_only_runs_on_the_same_latents():
    depth = _depth()
    run = lambda data, loss: dict(data=data, heldout=[dict(step=800, loss=loss)])
    records = {"24x64-base-s0": run("old", 0.1), "24x64-base-s2": run("new", 0.60),
               "24x64-b8-s2": run("new", 0.58), "24x64-b8-s3": run("new", 0.59),
               "6x128-base-s0": run("new", 0.56), "6x128-base-s1": run("new", 0.57)}
    steps = [dict(model=m, mode=mode, sra2=sra, ms=ms * (1 if mode == "fp32" else 0.8))
             for m, sra, ms in [("24x64", False, 700.0), ("24x64", True, 750.0), ("6x128", False, 500.0)]
             for mode in ("fp32", "bf16")]                        # the runs are fp32
    assert depth.equal_time(records, steps)[2:] == [
        "| 24x64 | baseline | 2 | 700 | 560 s | 0.6000 |",
        "| 24x64 | SRA 2, block 8 | 2, 3 | 750 | 600 s | 0.5850 |",
        "| 6x128 | baseline | 0, 1 | 500 | 400 s | 0.5650 |"]
    assert depth.equal_time({"24x64-base-s0": run("old", 0.1)}, steps) == []


def test_depth_study_long_run_reads_each_checkpoint_against_its_baseline():
    """Baseline 1.0 then 0.5; SRA 2 0.9 then 0.51 (-10%, +2%); control 0.95 then 0.49 (-5%, -2%):
    SRA 2 - control -5 then +4 points. A run without its baseline gives no table."""
    depth = _depth()
    run = lambda losses: dict(data="d", heldout=[dict(step=2500 * (i + 1), loss=x)
                                                 for i, x in enumerate(losses)])
    records = {"24x64-5k-base-s0": run([1.0, 0.5]), "24x64-5k-b8-s0": run([0.9, 0.51]),
               "24x64-5k-ctl8-s0": run([0.95, 0.49]), "24x64-base-s0": run([2.0, 2.0])}
    assert depth.long_rows(records)[2:] == ["| 2500 | 1.0000 | -10.00% | -5.00% | -5.00% |",
                                            "| 5000 | 0.5000 | +2.00% | -2.00% | +4.00% |"]
    del records["24x64-5k-ctl8-s0"]
    assert depth.long_rows(records)[3] == "| 5000 | 0.5000 | +2.00% |  |  |"
    assert depth.long_rows({"24x64-5k-b8-s0": run([0.9])}) == []


def test_depth_study_counts_the_checkpoints_where_the_control_is_ahead_of_sra2():
    depth = _depth()
    run = lambda losses: dict(data="d", heldout=[dict(step=100 * (i + 1), loss=x)
                                                 for i, x in enumerate(losses)])
    records = {"12x64-base-s0": run([1.0] * 8), "12x64-b2-s0": run([0.9] * 7 + [0.8]),
               "12x64-ctl2-s0": run([0.85] * 7 + [0.85]), "12x64-b2-s1": run([0.1] * 8)}
    assert depth.control_ahead(records, ["12x64"]) == (7, 8)        # seed 1 has no baseline
    assert depth.control_ahead(records, ["6x64"]) == (0, 0)


def _depth():
    spec = importlib.util.spec_from_file_location("depth", HERE / "results" / "depth.py")
    depth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(depth)
    return depth

def _study():
    spec = importlib.util.spec_from_file_location("study", HERE / "results" / "study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    return study


def test_study_pictures_name_the_seeds_each_line_and_dot_has(monkeypatch):
    """study_steps.png: a screen line names its seeds (one seed is not "mean of seeds 0, 1");
    study_gap.png: its title does not say every row has two seeds; charts are only captured."""
    study, drawn = _study(), {}
    monkeypatch.setattr(demo_infra, "line_chart", lambda path, series, title, *a, **k:
                        drawn.__setitem__(Path(path).name, (series, title)))
    monkeypatch.setattr(study, "gap_chart", lambda path, rows, title:
                        drawn.__setitem__(Path(path).name, (rows, title)))
    study.charts(study.load_records())
    labels = [series[0] for series in drawn["study_steps.png"][0] if series[0]]
    assert "small SiT, screen, seed 0" in labels and "lambda 0.1, screen, seeds 0, 1" in labels
    rows, title = drawn["study_gap.png"]
    assert any(len(gaps) == 1 for _, gaps in rows) and "seeds 0 and 1" not in title


def test_study_passes_resume_only_where_a_checkpoint_is(tmp_path):
    study = _study()
    (tmp_path / "a-s0" / "ckpt").mkdir(parents=True)
    (tmp_path / "a-s0" / "ckpt" / "sra2.pt").write_bytes(b"")
    echo = lambda job, data, work, threads: [sys.executable, "-c", "import sys; print(sys.argv)"]
    study.run(["a-s0", "b-s0"], 1, None, tmp_path, command=echo)
    assert "--resume" in (tmp_path / "a-s0.log").read_text()
    assert "--resume" not in (tmp_path / "b-s0.log").read_text()


@pytest.mark.slow
def test_resume_with_other_settings_names_them(reference_run, tmp_path, capsys):
    root, _ = reference_run
    shutil.copytree(root / "out", tmp_path / "out")
    line = error_line(capsys, [*demo_args(tmp_path, "out"), "--resume", "--lr", "0.002"])
    assert "is from another run (--lr: 0.001 there, 0.002 now)" in line
    line = error_line(capsys, [*demo_args(tmp_path, "out"), "--resume", "--n-images", "48"])
    assert "the training data" in line and "--n-images: 64 there, 48 now" in line


@pytest.mark.slow
def test_fresh_start_never_overwrites_an_unfinished_checkpoint(reference_run, tmp_path, capsys):
    root, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    ckpt = torch.load(out / "ckpt" / "sra2.pt", weights_only=True)
    del ckpt["record"]["final_fid"]
    ckpt["step"] = 6
    torch.save(ckpt, out / "ckpt" / "sra2.pt")
    before = file_states(out)
    line = error_line(capsys, demo_args(tmp_path, "out"))
    assert "sra2.pt holds an unfinished run (step 6 of 12): pass --resume" in line
    assert file_states(out) == before


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    """NaN from step 5 on (logged at 6): the run stops naming step 5, and the step-4 checkpoint,
    written before the NaN, is the one left, with finite weights."""
    real_loss, calls = sra2.training_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        parts = real_loss(*args, **kwargs)
        return {**parts, "loss": parts["loss"] * float("nan")} if len(calls) >= 5 else parts
    monkeypatch.setattr(sra2, "training_loss", poisoned)
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    line = error_line(capsys, [*TINY, "--steps", "8", "--log-every", "3", "--ckpt-every", "2",
                               "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    expected = "loss is nan at step 5; stopping (the last good checkpoint, step 4, is kept"
    assert expected in line, line
    ckpt = torch.load(tmp_path / "out" / "ckpt" / "baseline.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_with_nothing_to_resume_is_refused_and_the_log_says_why(tmp_path, capsys):
    """A typo in --out must not start an hours-long run from scratch; the error is in the log."""
    line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o"), "--cache",
                               str(tmp_path / "c"), "--resume"])
    assert line == (f"tiny_demo: error: --resume: no checkpoint of this run in {tmp_path / 'o'}"
                    "/ckpt; nothing to resume (without --resume it starts from scratch)")
    assert (tmp_path / "o" / "log.txt").read_text().splitlines()[-1] == line


def test_rerun_into_a_finished_out_is_refused_and_changes_nothing(reference_run, tmp_path, capsys):
    """A finished run's folder (its checkpoints, or only its results.json) is never written over
    by a fresh start, with the same settings or others."""
    root, _ = reference_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = file_states(out)
    for extra in ([], ["--steps", "6"]):
        line = error_line(capsys, [*demo_args(tmp_path, "out"), *extra])
        assert f"--out {out} holds a run's results ({out / 'results.json'}): give another --out" \
            in line
    shutil.rmtree(out / "ckpt")
    assert "holds a run's results" in error_line(capsys, demo_args(tmp_path, "out"))
    assert file_states(out) == {p: b for p, b in before.items() if "ckpt" not in p.parts}


def test_a_baseline_resumes_whatever_the_sra2_settings_and_a_mismatch_is_short(reference_run,
                                                                              tmp_path, capsys,
                                                                              monkeypatch):
    root, _ = reference_run
    shutil.copytree(root / "out", tmp_path / "out")
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    records = tiny_demo.main([*demo_args(tmp_path, "out"), "--resume", "--runs", "baseline",
                              "--lam", "0.5", "--mlp-depth", "2"])
    assert "tiny: finished; its record is reused" in capsys.readouterr().out
    assert set(records) == {("baseline", 0)}
    line = error_line(capsys, [*demo_args(tmp_path, "out"), "--resume", "--runs", "sra2",
                               "--lam", "0.5", "--mlp-depth", "2", "--lr", "0.002"])
    assert "is from another run (--lam: 1.0 there, 0.5 now; --lr: 0.001 there, 0.002 now; " \
        "--mlp-depth: 5 there, 2 now)" in line and len(line.replace(str(tmp_path), "")) < 250


def test_ctrl_c_saves_a_checkpoint_and_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during step 3: the step ends, its checkpoint is saved, one line (also in the log),
    exit status 130; --resume goes on from step 3."""
    real_loss, calls, usual = sra2.training_loss, [], signal.getsignal(signal.SIGINT)

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(sra2, "training_loss", interrupted)
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    argv = [*TINY, "--steps", "6", "--ckpt-minutes", "0", "--out", str(tmp_path / "o"),
            "--cache", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as exit_info:
        tiny_demo.main(argv)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    path = tmp_path / "o" / "ckpt" / "baseline.pt"
    assert err == [f"tiny_demo: error: interrupted (Ctrl-C): tiny stopped at step 3 of 6, "
                   f"saved to {path}; the same command with --resume goes on from there"]
    assert torch.load(path, weights_only=True)["step"] == 3
    assert (tmp_path / "o" / "log.txt").read_text().splitlines()[-1] == err[0]
    assert signal.getsignal(signal.SIGINT) is usual                            # restored
    monkeypatch.setattr(sra2, "training_loss", real_loss)
    tiny_demo.main([*argv, "--resume", "--runs", "baseline"])
    assert "resumed at step 3" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_where_settings_were_clipped_to_the_data(tmp_path, monkeypatch, capsys):
    """--fid-ref-n above the number of images is clipped to it before anything is saved or compared,
    so the same command with --resume finds its own checkpoints, not "another run"."""
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    argv = [*TINY, "--steps", "2", "--evals", "1", "--heldout-evals", "1", "--fid-ref-n", "1000",
            "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
    first = tiny_demo.main(argv)
    again = tiny_demo.main([*argv, "--resume"])
    assert "finished; its record is reused" in capsys.readouterr().out
    assert again["sra2", 0]["final_fid"] == first["sra2", 0]["final_fid"]


# ---------------------------------------------------------------- torchrun DDP

def held_store():
    """A TCPStore on a port the system picks, held open by this process as torchrun's agent holds
    one; the ranks join it as clients (TORCHELASTIC_USE_AGENT_STORE), so no other process can take
    the port between its choice and its use."""
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.mark.slow
def test_two_gloo_ranks_end_where_one_process_does(reference_run, tmp_path, monkeypatch):
    """What torchrun does (env RANK, WORLD_SIZE, MASTER_ADDR/PORT; two processes, gloo on CPU),
    global batch 8 = 2 x 4, resuming a one-process run that stopped after the baseline's step-6
    checkpoint: the baseline goes on from step 6 and SRA 2 starts from scratch on two ranks, and
    both end with the one-process run's weights (up to float rounding: the gradient is averaged
    over two halves instead of taken at once), its losses and its sharded-then-gathered samples.
    Rank 1 prints nothing and writes nothing (it is given a copy of --out of its own to prove it).
    DDP's unused-parameter check is on: the baseline (no P) and SRA 2 both train through it."""
    root, records = reference_run
    real_save = tiny_demo.save_checkpoint

    def save_then_crash(path, model, ema, projector, opt, step, *rest):
        real_save(path, model, ema, projector, opt, step, *rest)
        if step == 6:
            raise InterruptedError("stopped here")
    monkeypatch.setattr(tiny_demo, "FIDMeter", FakeFID)
    monkeypatch.setattr(tiny_demo, "save_checkpoint", save_then_crash)
    with pytest.raises(InterruptedError):
        tiny_demo.main(demo_args(tmp_path, "out0", cache=root / "cache"))
    shutil.copytree(tmp_path / "out0", tmp_path / "out1")
    rank1_files = {p: p.read_bytes() for p in (tmp_path / "out1").rglob("*") if p.is_file()}
    store = held_store()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE="2",
               TORCHELASTIC_USE_AGENT_STORE="True")
    ranks = [run_child(demo_args(tmp_path, f"out{rank}", "--resume", cache=root / "cache"),
                       env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(2)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]
    del store
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert outputs[1] == ("", "") and "x 2 processes (DDP)" in outputs[0][0]
    assert "resumed at step 6" in outputs[0][0]
    assert {p: p.read_bytes() for p in (tmp_path / "out1").rglob("*") if p.is_file()} == rank1_files
    for name in ("baseline", "sra2"):
        assert_same_checkpoint(root / "out" / "ckpt" / f"{name}.pt",
                               tmp_path / "out0" / "ckpt" / f"{name}.pt", atol=1e-5)
        ddp = torch.load(tmp_path / "out0" / "ckpt" / f"{name}.pt", weights_only=True)["record"]
        one = records[name, 0]
        for key in ("loss", "align"):
            assert np.allclose([e[key] for e in ddp["log"]], [e[key] for e in one["log"]],
                               rtol=1e-5)
        # uint8 rounding
        assert (ddp["final_grid"].int() - one["final_grid"].int()).abs().max() <= 1


@pytest.mark.usefixtures("one_thread")
def test_sampling_sharded_over_ranks_gives_the_same_images(monkeypatch):
    """generate() under 2 ranks: rank r samples chunks r, r + 2, ...; gathered, the images are
    those of one process, bit for bit (each chunk has its own generator)."""
    s = tiny_demo.parse_args([*TINY, "--sample-batch", "2"])
    tiny_demo.check(s)
    torch.manual_seed(0)
    model = tiny_demo.sra2.create_sit("SiT-S/2", depth=1, hidden_size=64, num_heads=1,
                                      input_size=16, align_depth=1, in_channels=4,
                                      num_classes=10).eval()
    stage = SimpleNamespace(vae=tiny_demo.VAE(8, 4).eval(), shift=0.0, scale=1.0)
    one = tiny_demo.generate(model, stage, 7, 2, s, torch.device("cpu"), "x")
    parts = {}

    # all_gather_object, as 2 ranks see it
    def gather(rank):
        def all_gather_object(out, mine):
            parts[rank] = mine
            out[:] = [parts.get(0, []), parts.get(1, [])]
        return all_gather_object
    images = {}
    # rank 1 first: rank 0 then gathers both
    for rank in (1, 0):
        for module in (tiny_demo, demo_infra):
            monkeypatch.setattr(module, "rank_and_world", lambda: (rank, 2))
        monkeypatch.setattr(tiny_demo.dist, "all_gather_object", gather(rank))
        images[rank] = tiny_demo.generate(model, stage, 7, 2, s, torch.device("cpu"), "x")
    # 4 chunks of <= 2
    assert [c for c, _ in parts[0]] == [0, 2] and [c for c, _ in parts[1]] == [1, 3]
    # gathered: one process's images
    assert torch.equal(images[0], one)


# =============================================================================================
# Bad input: a ValueError (library) or one line and exit status 2 (command line) that names the
# problem, before any heavy work and without losing anything
# =============================================================================================


# ---------------------------------------------------------------- sra2.py

def _call(x_shape=(2, 4, 8, 8), t=(0.5, 0.5), y=(1, 2), x_fill=None):
    model = tiny_sit()
    x = torch.randn(x_shape) if x_fill is None else torch.full(x_shape, x_fill)
    return model(x, torch.tensor(t), torch.tensor(y))


@pytest.mark.parametrize("kwargs,match", [
    (dict(x_shape=(2, 3, 8, 8)), "must be \\(N, 4, H, W\\)"),
    (dict(x_shape=(2, 4, 16, 16)), "input_size 8"),
    (dict(x_shape=(2, 4, 7, 8)), "not divisible by patch"),
    (dict(x_shape=(4, 8, 8)), "must be \\(N, 4, H, W\\)"),
    (dict(y=(1, 11)), "labels must be in \\[0, 10\\]"),
    (dict(y=(-1, 2)), "labels must be in"),
    (dict(y=(1.0, 2.0)), "must be integers"),
    (dict(y=(1, 2, 3)), "must be \\(N,\\)"),
    (dict(t=(0.5, 1.5)), "t must be finite and in \\[0, 1\\]"),
    (dict(t=(-0.1, 0.5)), "t must be finite"),
    (dict(t=(float("nan"), 0.5)), "t must be finite"),
    (dict(x_fill=float("inf")), "NaN or Inf"),
])
def test_bad_forward_inputs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


@pytest.mark.parametrize("build,match", [
    (lambda: sra2.create_sit("SiT-M/2"), "unknown model"),
    (lambda: sra2.create_sit("SiT-S/2", widht=3), "unknown SiTConfig field"),
    (lambda: tiny_sit(input_size=9), "not divisible by patch"),
    (lambda: tiny_sit(align_depth=5), "align_depth 5 is outside"),
    (lambda: tiny_sit(num_heads=5), "must divide"),
    (lambda: sra2.Projector(8, 4, depth=0), "depth must be >= 1"),
    (lambda: sra2.path_coefficients(torch.ones(1), "vp"), "unknown path"),
    (lambda: sra2.alignment_loss(torch.ones(1, 1, 1), torch.ones(1, 1, 1), "huber"),
     "unknown alignment"),
    (lambda: sra2.sample_ode(None, torch.ones(1), None, method="rk4"), "unknown ODE method"),
    (lambda: sra2.sample_sde(tiny_sit(), *batch(2)[::2], num_steps=0),
     "num_steps must be >= 1, got 0"),
    (lambda: sra2.sample_ode(tiny_sit(), *batch(2)[::2], num_steps=0),
     "num_steps must be >= 1, got 0"),
    (lambda: sra2.training_loss(m := tiny_sit(), *batch()[::2], sra2.make_projector(m),
                                align_depth=9), "align depth 9 is outside the model's blocks 1..4"),
    (lambda: tiny_sit(class_dropout_prob=0.0)(torch.randn(1, 4, 8, 8), torch.tensor([0.5]),
                                              torch.tensor([10])), "absent"),
    (lambda: tiny_sit()(*batch(2), drop_labels=torch.tensor([1, 0])), "mask must be bool \\(2,\\)"),
    (lambda: tiny_sit()(*batch(2), drop_labels=torch.tensor([True])), "mask must be bool \\(2,\\)"),
    (lambda: tiny_sit(class_dropout_prob=0.0)(*batch(2), drop_labels=torch.tensor([True, False])),
     "no null label"),
])
@pytest.mark.usefixtures("one_thread")                            # small ops: see one_thread
def test_bad_settings_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------- fid.py

def _fid_image_folder(path, sizes=((8, 8), (8, 8))):
    """A folder of random PNGs, 0.png, 1.png, ..., of the given (H, W) sizes."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_fid_bad_statistics_raise_clear_errors():
    mu, sigma = _fid_random_stats(0, 8, 20)
    with pytest.raises(ValueError, match="dimensions"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        fid.frechet_distance(mu, sigma[:4], mu, sigma)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid.frechet_distance(np.where(np.arange(8) == 3, np.nan, mu), sigma, mu, sigma)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid.frechet_distance(mu, sigma, mu, np.full_like(sigma, np.inf))
    with pytest.raises(ValueError, match="symmetric"):
        fid.frechet_distance(mu, sigma + np.triu(np.ones_like(sigma), 1), mu, sigma)
    q = scipy.stats.ortho_group.rvs(8, random_state=0)
    indefinite = (q * np.array([-0.5, 1, 1, 2, 2, 3, 3, 4])) @ q.T  # one negative eigenvalue
    with pytest.raises(ValueError, match="sigma1 is not positive semi-definite"):
        fid.frechet_distance(mu, indefinite, mu, sigma)
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
        fid.frechet_distance(mu, np.eye(8), mu, indefinite)


def test_fid_inception_score_bad_input():
    with pytest.raises(ValueError, match="N >= splits"):
        fid.inception_score(np.zeros((5, 1008)), splits=10)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid.inception_score(np.full((20, 1008), np.nan), splits=10)


def test_fid_feature_stats_bad_input():
    stats = fid.FeatureStats()
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="D = 5"):
        stats.update(np.ones((2, 5)))


def test_fid_bad_images_raise_clear_errors():
    model = _FidStandIn()
    with pytest.raises(ValueError, match="empty"):
        fid.compute_statistics(np.zeros((0, 32, 32, 3), np.uint8), model=model)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.compute_statistics(np.zeros((1, 32, 32, 3), np.uint8), model=model)
    with pytest.raises(ValueError, match="3 channels"):
        fid.compute_statistics(np.zeros((4, 32, 32, 4), np.uint8), model=model)
    with pytest.raises(ValueError, match="3 channels"):
        fid.compute_statistics(np.zeros((4, 32, 32), np.uint8), model=model)
    with pytest.raises(ValueError, match="uint8"):
        fid.compute_statistics(np.zeros((4, 32, 32, 3), np.float32), model=model)
    with pytest.raises(ValueError, match="no images"):
        fid.compute_statistics(iter([]), model=model)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.compute_statistics(iter([np.zeros((1, 32, 32, 3), np.uint8)]), model=model)
    with pytest.raises(ValueError, match="fc"):
        fid.compute_statistics(np.zeros((2, 32, 32, 3), np.uint8), model=model,
                               return_is_logits=True)
    assert len(model.seen_precisions) == 1  # only the one-image stream got as far as the network


def test_fid_cli_missing_paths_are_named_before_any_work(tmp_path, capsys):
    good = tmp_path / "good.npz"
    fid.save_statistics(good, np.zeros(3), np.eye(3))
    nowhere = tmp_path / "missing"
    no_weights = ["--weights", tmp_path / "none.pth"]  # a path error must come before the weights'
    assert _fid_error_line(capsys, [nowhere, good, *no_weights]) == \
        f"{nowhere}: no such file or directory"
    assert _fid_error_line(capsys, [good, f"{nowhere}.npz"]) == \
        f"{nowhere}.npz: no such file or directory"
    assert _fid_error_line(capsys, [nowhere, tmp_path / "s.npz", "--save-stats", *no_weights]) == \
        f"{nowhere}: no such file or directory"
    (tmp_path / "notes.txt").write_text("hi")
    assert _fid_error_line(capsys, [tmp_path / "notes.txt", good]) == \
        f"{tmp_path / 'notes.txt'}: neither an image folder nor an .npz file"
    with pytest.raises(FileNotFoundError, match="missing: no such file or directory"):
        fid.statistics_from_folder(nowhere)
    with pytest.raises(NotADirectoryError, match="notes.txt: not a folder"):
        fid.statistics_from_folder(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_statistics(f"{nowhere}.npz")


def test_fid_cli_corrupt_or_foreign_npz_is_one_line_naming_it(tmp_path, capsys):
    good = tmp_path / "good.npz"
    fid.save_statistics(good, np.zeros(3), np.eye(3))
    # numpy would try to unpickle it
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")           # an .npy under an .npz name
    (tmp_path / "half.npz").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    np.savez(tmp_path / "pickled.npz", mu=np.array([{}], dtype=object), sigma=np.eye(1))
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
    np.savez(tmp_path / "d4.npz", mu=np.zeros(4), sigma=np.eye(4))
    expected = {"text.npz": ": not a readable .npz file (ValueError: not a zip archive)",
                "array.npz": ": not a readable .npz file (ValueError: not a zip archive)",
                "half.npz": ": not a readable .npz file (BadZipFile: ",
                "pickled.npz": ": not a readable .npz file (ValueError: Object arrays cannot be "
                               "loaded",
                "keys.npz": " needs keys 'mu' and 'sigma', has ['mean']"}
    for name, message in expected.items():
        line = _fid_error_line(capsys, [good, tmp_path / name])
        assert line.startswith(f"{tmp_path / name}{message}")
        with pytest.raises(ValueError, match=name):
            fid.load_statistics(tmp_path / name)
    assert _fid_error_line(capsys, [good, tmp_path / "d4.npz"]) == \
        "statistics have different dimensions: 3 and 4"


def test_fid_cli_save_stats_reads_a_folder_and_writes_an_npz_in_a_folder_that_exists(tmp_path,
                                                                                      capsys):
    folder, good = _fid_image_folder(tmp_path / "images"), tmp_path / "good.npz"
    # no convention recorded: not "None convention"
    fid.save_statistics(good, np.zeros(3), np.eye(3))
    assert _fid_error_line(capsys, [good, tmp_path / "s.npz", "--save-stats"]) == \
        f"--save-stats computes the statistics of an image folder; {good} is a file"
    assert _fid_error_line(capsys, [folder, tmp_path / "nodir" / "s.npz", "--save-stats"]) == \
        f"{tmp_path / 'nodir'}: no such folder to save s.npz in"
    for out in (tmp_path / "s.txt", folder):
        assert _fid_error_line(capsys, [folder, out, "--save-stats"]) == \
            f"--save-stats writes an .npz file; {out} is not an .npz file name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "images"]  # nothing written
    with pytest.raises(FileNotFoundError, match="nodir: no such folder to save s.npz in"):
        fid.save_statistics(tmp_path / "nodir" / "s.npz", np.zeros(3), np.eye(3))


def test_fid_cli_bad_batch_size_device_and_convention(tmp_path, capsys):
    folder = _fid_image_folder(tmp_path / "images")
    run = [folder, tmp_path / "s.npz", "--save-stats", "--weights", tmp_path / "none.pth"]
    for value in ("0", "-3", "x"):
        assert _fid_error_line(capsys, [*run, "--batch-size", value]) == \
            f"argument --batch-size: must be an integer >= 1, got '{value}'"
    for device in ("foo", "meta"):
        assert _fid_error_line(capsys, [*run, "--device", device]) == \
            f"device '{device}': expected cpu, cuda, cuda:N or mps"
    # no network needed, still checked
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    assert _fid_error_line(capsys, [tmp_path / "a.npz", tmp_path / "a.npz", "--device", "foo"]) == \
        "device 'foo': expected cpu, cuda, cuda:N or mps"
    n_cuda = torch.cuda.device_count()
    assert _fid_error_line(capsys, [*run, "--device", f"cuda:{n_cuda}"]) == \
        f"device 'cuda:{n_cuda}': this machine has {n_cuda} CUDA device(s)"
    assert _fid_error_line(capsys, [*run, "--convention", "bogus"]).startswith(
        "argument --convention: invalid choice: 'bogus'")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        fid.compute_statistics(np.zeros((2, 8, 8, 3), np.uint8), model=_FidStandIn(), batch_size=0)
    with pytest.raises(ValueError, match="device 'foo'"):
        fid.load_inception(tmp_path / "none.pth", device="foo")


def test_fid_cli_bad_folders_are_named_before_the_network(tmp_path, capsys):
    out, no_weights = tmp_path / "s.npz", ["--weights", tmp_path / "none.pth"]  # never reached
    (tmp_path / "empty").mkdir()
    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "README.txt").write_text("not an image, and not counted as one")
    for folder in (tmp_path / "empty", only_text):
        line = _fid_error_line(capsys, [folder, out, "--save-stats", *no_weights])
        assert line.startswith("no images (.bmp, .jpeg,") and line.endswith(f"found in {folder}")
    junk = _fid_image_folder(tmp_path / "junk")
    (junk / "1.png").write_bytes(b"not a png")
    assert _fid_error_line(capsys, [junk, out, "--save-stats", *no_weights]) == (
        f"{junk / '1.png'}: not a readable image (UnidentifiedImageError: cannot identify image "
        f"file '{junk / '1.png'}')")
    mixed = _fid_image_folder(tmp_path / "mixed", sizes=[(8, 8), (8, 8), (8, 16), (4, 4)])
    assert _fid_error_line(capsys, [mixed, out, "--save-stats", *no_weights]) == (
        f"{mixed / '2.png'} is 16x8 but {mixed / '0.png'} is 8x8: a folder's images must have one "
        f"size (resize them first)")
    with pytest.raises(ValueError, match="2.png is 16x8"):
        fid.statistics_from_folder(mixed, model=_FidStandIn())
    assert not out.exists()


def test_fid_cli_truncated_image_is_one_line(tmp_path, capsys, monkeypatch):
    """A truncated file passes the header check; decoding it is one line too (the network here is
    the cheap stand-in)."""
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: _FidStandIn())
    folder = _fid_image_folder(tmp_path / "images", sizes=[(64, 64), (64, 64)])
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[:len(data) // 2])
    assert _fid_error_line(capsys, [folder, tmp_path / "s.npz", "--save-stats",
                                    "--device", "cpu"]) == \
        f"{folder / '1.png'}: not a readable image (OSError: image file is truncated)"
    assert not (tmp_path / "s.npz").exists()


def test_fid_cli_bad_weights_file_is_one_line_naming_it(tmp_path, capsys):
    folder = _fid_image_folder(tmp_path / "images")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    (tmp_path / "hello.pth").write_text("hello")                      # torch.load: KeyError '101'
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    # The reasons in brackets are torch's own words (its versions vary them); the start is ours.
    (tmp_path / "afile.txt").write_text("this is a text file\n")
    for name, reason in [("junk.pth", "(not a file torch.save wrote)"),
                         ("hello.pth", "(not a file torch.save wrote)"),
                         ("afile.txt", "(not a file torch.save wrote)"),
                         ("other.pth",
                          "(RuntimeError: Error(s) in loading state_dict for FIDInceptionV3: "),
                         ("tensor.pth", "(AttributeError: ")]:
        weights = tmp_path / name
        line = _fid_error_line(capsys, [folder, tmp_path / "s.npz", "--save-stats", "--device",
                                        "cpu", "--weights", weights])
        assert line.startswith(f"{weights}: not the FID Inception weights {reason}"), line
        with pytest.raises(ValueError, match=f"{name}: not the FID Inception weights"):
            fid.load_inception(weights)
    assert _fid_error_line(capsys, [folder, tmp_path / "s.npz", "--save-stats", "--device", "cpu",
                                    "--weights", tmp_path / "none.pth"]) == \
        f"FID Inception weights not found: {tmp_path / 'none.pth'}"
    assert not (tmp_path / "s.npz").exists()


def test_fid_cli_save_stats_never_loses_what_was_written(tmp_path, capsys, monkeypatch):
    """An existing PATH2 is refused before any work, byte for byte kept; a save that fails midway
    leaves no file and no temp file; a good run writes it and names its convention."""
    folder, out = _fid_image_folder(tmp_path / "images"), tmp_path / "s.npz"
    fid.save_statistics(out, np.zeros(3), np.eye(3), convention="tf")
    before = out.read_bytes()
    assert _fid_error_line(capsys, [folder, out, "--save-stats", "--device", "cpu", "--weights",
                                    tmp_path / "none.pth"]) == \
        f"--save-stats: {out} exists; give another file name, or move it away (nothing was changed)"
    assert out.read_bytes() == before
    out.unlink()

    def torn_savez(file, **arrays):  # file: the temporary .npz path
        Path(file).write_bytes(b"PK half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: _FidStandIn())
    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", torn_savez)
        assert _fid_error_line(capsys, [folder, out, "--save-stats", "--device", "cpu"]) == \
            "[Errno 28] No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]   # no temp file
    argv = [str(folder), str(out), "--save-stats", "--device", "cpu", "--convention", "pytorch-fid"]
    assert fid.main(argv) is None
    assert capsys.readouterr().out == f"saved statistics (pytorch-fid convention) to {out}\n"
    assert fid.load_statistics(out)[0].shape == (2048,)
    assert fid.load_statistics(out, return_convention=True)[2] == "pytorch-fid"


def test_fid_cli_checks_counts_and_conventions_before_the_network(tmp_path, capsys):
    """One image, or statistics of two conventions (a folder's is --convention), are refused
    before the Inception weights are even looked for."""
    one = _fid_image_folder(tmp_path / "one", sizes=[(8, 8)])
    two = _fid_image_folder(tmp_path / "two")
    no_weights = ["--weights", tmp_path / "none.pth", "--device", "cpu"]
    assert _fid_error_line(capsys, [one, two, *no_weights]) == \
        f"{one}: 1 image; FID needs a covariance, so at least 2"
    fid.save_statistics(tmp_path / "a.npz", np.zeros(3), np.eye(3), convention="tf")
    fid.save_statistics(tmp_path / "b.npz", np.zeros(3), np.eye(3), convention="pytorch-fid")
    mixed = "the statistics use different conventions (pytorch-fid vs tf): FID is meaningless"
    assert _fid_error_line(capsys, [tmp_path / "a.npz", tmp_path / "b.npz"]).startswith(mixed)
    assert _fid_error_line(capsys, [tmp_path / "a.npz", two, *no_weights, "--convention",
                                    "pytorch-fid"]).startswith(mixed)


def test_fid_cli_names_each_folder_in_its_progress_lines(tmp_path, capsys, monkeypatch):
    """Two small folders (one batch each, which the progress bar alone never shows): each pass
    says which folder it reads."""
    monkeypatch.setattr(fid, "load_inception", lambda weights, device: _FidStandIn())
    a, b = _fid_image_folder(tmp_path / "a"), _fid_image_folder(tmp_path / "b")
    fid.main([str(a), str(b), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"Inception features of {a} (2 images)" in err
    assert f"Inception features of {b} (2 images)" in err


# ---------------------------------------------------------------- tiny_demo.py

def test_bad_data_path(tmp_path, capsys):
    line = error_line(capsys, [*TINY, "--data", str(tmp_path / "nowhere"),
                               "--out", str(tmp_path / "o")])
    assert "no such file or folder" in line and "nowhere" in line


def test_folder_without_batches(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = error_line(capsys, [*TINY, "--data", str(tmp_path / "empty"),
                               "--out", str(tmp_path / "o")])
    assert "not a CIFAR-10 python folder" in line and "data_batch_1" in line
    (tmp_path / "parent" / "cifar-10-batches-py").mkdir(parents=True)       # the parent is named
    line = error_line(capsys, [*TINY, "--data", str(tmp_path / "parent"), "--out", str(tmp_path)])
    assert f"--data {tmp_path / 'parent'}: not a CIFAR-10 python folder" in line, line


def test_corrupt_batch_file(tmp_path, capsys):
    folder, _, _ = write_cifar_folder(tmp_path / "data")
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    line = error_line(capsys, [*TINY, "--data", str(folder), "--out", str(tmp_path / "o")])
    assert "data_batch_3: corrupt CIFAR-10 batch file" in line


def test_batch_file_that_would_run_code(tmp_path, capsys):
    folder, _, _ = write_cifar_folder(tmp_path / "data")
    # os.system('echo pwned')
    (folder / "data_batch_2").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    line = error_line(capsys, [*TINY, "--data", str(folder), "--out", str(tmp_path / "o")])
    assert "corrupt CIFAR-10 batch file" in line and "refusing to load" in line


def test_truncated_archive(tmp_path, capsys):
    folder, _, _ = write_cifar_folder(tmp_path / "data", n_per_batch=50)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    line = error_line(capsys, [*TINY, "--data", str(archive), "--out", str(tmp_path / "o")])
    assert "corrupt or truncated archive" in line


def test_not_an_archive(tmp_path, capsys):
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(b"hello"))
    line = error_line(capsys, [*TINY, "--data", str(tmp_path / "x.tar.gz"),
                               "--out", str(tmp_path / "o")])
    assert "x.tar.gz" in line and ("corrupt" in line or "not the CIFAR-10" in line)


def test_align_depth_beyond_model_depth(tmp_path, capsys):
    line = error_line(capsys, [*TINY, "--align-depth", "5", "--out", str(tmp_path / "o")])
    assert "--align-depth 5 is beyond tiny's 4 blocks" in line
    line = error_line(capsys, ["--model", "SiT-B/2", "--align-depth", "13",
                               "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "choose 1..12" in line


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--fid-n", "--log-every"])
def test_zero_counts(tmp_path, capsys, flag):
    line = error_line(capsys, [*TINY, flag, "0", "--out", str(tmp_path / "o")])
    assert flag in line and "got 0" in line


def test_batch_larger_than_dataset_and_bad_t_range(tmp_path, capsys):
    line = error_line(capsys, [*TINY, "--batch-size", "65", "--out", str(tmp_path / "o"),
                               "--cache", str(tmp_path)])
    assert "more than the 64 training images" in line
    line = error_line(capsys, [*TINY, "--t-range", "0.5", "0.2", "--out", str(tmp_path / "o")])
    assert line == ("tiny_demo: error: --t-range must be LO HI with 0 <= LO < HI <= 1 "
                    "(t = 0 data, t = 1 noise), got 0.5 0.2")


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--fid-n", "1"], "--fid-n must be >= 2 (FID needs a covariance), got 1"),
    (["--fid-ref-n", "1"], "--fid-ref-n must be >= 2 (FID needs a covariance), got 1"),
    (["--model", "SiT-M/2"], "argument --model: invalid choice"),
    (["--align-loss", "huber"], "argument --align-loss: invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--seed", "1,x"], "--seed '1,x': need distinct integers in 0..2147483647"),
    (["--seed", "1,01"], "--seed '1,01': need distinct integers"),
    (["--seed", "4294967296"], "need distinct integers in 0..2147483647, comma-separated"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1"),
    (["--lam", "-1"], "--lam must be >= 0, got -1"),
    (["--grad-clip", "0"], "--grad-clip must be > 0, got 0"),
    (["--target-scale", "0"], "--target-scale must be > 0, got 0"),
    (["--target", "other", "--batch-size", "1"], "--target other needs --batch-size >= 2"),
    (["--preset", "gpu"], "argument --preset: invalid choice: 'gpu'"),
    (["--clip", "both"], "argument --clip: invalid choice: 'both'"),
    (["--runs", "sra3"], "argument --runs: invalid choice: 'sra3'"),
    (["--runs", "sra2,sra2"], "argument --runs: invalid choice: 'sra2,sra2'"),
    (["--evals", "-1"], "--evals must be >= 0, got -1"),
    (["--heldout-evals", "-1"], "--heldout-evals must be >= 0, got -1"),
    (["--heldout-n", "5"], "--heldout-n must be >= 12 (one image per point of the t grid), got 5"),
    (["--final-fid-n", "1"],
     "--final-fid-n must be >= 2 (FID needs a covariance), or 0 for none, got 1"),
    (["--mlp-width", "0"], "--mlp-width must be >= 1, got 0"),
    (["--vae-kl", "-1"], "--vae-kl must be >= 0, got -1"),
    (["--ckpt-every", "-1"], "--ckpt-every must be >= 0, got -1"),
    (["--ckpt-minutes", "inf"], "--ckpt-minutes must be a finite number"),
    (["--t-range", "0", "nan"], "--t-range must be a finite number"),
    (["--fid-sampling-steps", "0"], "--fid-sampling-steps must be >= 1, got 0"),
    (["--final-sampling-steps", "0"], "--final-sampling-steps must be >= 1, got 0"),
    (["--n-images", "0"], "--n-images must be >= 1"),
    (["--vae-width", "12"], "--vae-width must be a multiple of 8"),
    (["--evals", "11"], "--evals 11 / --heldout-evals 2: more than --steps 10"),
    (["--heldout-evals", "11"], "--evals 5 / --heldout-evals 11: more than --steps 10"),
    (["--align-depth", "0"], "--align-depth 0 is beyond tiny's 4 blocks (choose 1..4)"),
    (["--device", "abc"], "--device abc:"),
    (["--device", "mps:0" if not torch.backends.mps.is_available() else "cuda:99"],
     "is not available"),
])
def test_bad_flag_is_one_line(tmp_path, capsys, flags, expected):
    line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"),
                               *flags])
    assert line.startswith("tiny_demo: error: ") and expected in line, line


def test_batch_that_does_not_split_over_torchrun_ranks(tmp_path, capsys, monkeypatch):
    # as torchrun --nproc_per_node=3 sets it
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o")])
    assert "--batch-size 8 does not split evenly over 3 processes" in line


def test_out_or_cache_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    for flag in ("--out", "--cache"):
        line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o"), "--cache",
                                   str(tmp_path / "c"), flag, str(tmp_path / "f")])
        assert "cannot create --out/--cache folder" in line
    assert (tmp_path / "f").read_text() == "mine"


def test_inception_weights_missing_or_not_inception(tmp_path, capsys):
    line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"),
                               "--inception", str(tmp_path / "none.pth")])
    assert "FID Inception weights not found" in line and "none.pth" in line
    (tmp_path / "junk.pth").write_bytes(b"junk")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    for name in ("junk.pth", "other.pth"):
        line = error_line(capsys, [*TINY, "--out", str(tmp_path / "o"), "--cache",
                                   str(tmp_path / "c"), "--inception", str(tmp_path / name)])
        assert f"--inception {tmp_path / name}: not the FID Inception weights" in line, line


def test_cached_cifar_archive_with_wrong_md5(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cifar-10-python.tar.gz").write_bytes(b"half a download")
    line = error_line(capsys, ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"),
                               "--steps", "1", "--evals", "1", "--heldout-evals", "1", "--device",
                               "cpu"])                   # on a GPU, setup would turn TF32 on
    assert "MD5 mismatch (corrupt file); delete it to download again" in line
    assert (tmp_path / "c" / "cifar-10-python.tar.gz").read_bytes() == b"half a download"


@pytest.mark.slow
def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    """The real process: status 2, one line on stderr, no traceback."""
    result = subprocess.run([sys.executable, str(HERE / "tiny_demo.py"), "--batch-size", "0",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "tiny_demo: error: --batch-size must be >= 1, got 0"


# =============================================================================================
# CUDA (skipped without a GPU)
# =============================================================================================


@needs_cuda
def test_cuda_forward_and_loss_match_cpu():
    model = perturbed(tiny_sit()).eval()
    projector = sra2.make_projector(model)
    z, t, y = batch()
    eps = torch.randn_like(z)
    cpu = sra2.training_loss(model, z, y, projector, t=t, eps=eps)
    gpu = sra2.training_loss(model.cuda(), z.cuda(), y.cuda(), projector.cuda(), t=t.cuda(),
                             eps=eps.cuda())
    for key in cpu:
        assert abs(gpu[key].item() - cpu[key].item()) < 1e-3 * abs(cpu[key].item()) + 1e-6


@needs_cuda
def test_cuda_bf16_sampler_is_finite_and_reproducible():
    model = perturbed(tiny_sit()).eval().cuda()
    noise, _, y = batch()
    run = lambda: sra2.sample_sde(model, noise.cuda(), y.cuda(), num_steps=10, cfg_scale=2.0,
                                  generator=torch.Generator("cuda").manual_seed(0))
    with sra2.autocast("cuda"):
        a, b = run(), run()
    assert torch.isfinite(a).all() and torch.equal(a, b)


@needs_cuda
def test_cuda_bad_labels_raise_value_error_not_device_assert():
    model = tiny_sit().cuda()
    with pytest.raises(ValueError, match="labels must be in"):
        model(torch.randn(1, 4, 8, 8, device="cuda"), torch.tensor([0.5], device="cuda"),
              torch.tensor([11], device="cuda"))


@needs_cuda
def test_cuda_compiled_loss_matches_eager_within_bf16_tolerance():
    model = perturbed(tiny_sit()).cuda().eval()                    # eval: no random label dropout
    projector = sra2.make_projector(model).cuda()
    z, t, y = (a.cuda() for a in batch(n=8))
    eps = torch.randn_like(z)
    fn = lambda net: sra2.training_loss(net, z, y, projector, t=t, eps=eps)
    # the model compiled, the tap outside
    with sra2.autocast("cuda"):
        compiled, eager = fn(torch.compile(model, fullgraph=True)), fn(model)
    # one bf16 ulp (2^-8) of the value
    for key in ("denoise", "align", "loss"):
        assert abs(compiled[key].item() - eager[key].item()) < 2 ** -8 * abs(eager[key].item())


# =============================================================================================
# Benchmark smoke run (speed is measured by `python bench.py`, never asserted here)
# =============================================================================================


@pytest.mark.slow
def test_benchmark_quick_mode_runs_and_reports_every_row(tmp_path, capsys):
    # Stands in for SiT's models.py: the official constructor's signature, and no config: only
    # blocks and patch_size.
    official = tmp_path / "models.py"
    official.write_text(
        "import sra2, torch\n"
        "class SiT(torch.nn.Module):\n"
        "    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth,\n"
        "                 num_heads, mlp_ratio, class_dropout_prob, num_classes, learn_sigma):\n"
        "        super().__init__()\n"
        "        self.net = sra2.SiT(sra2.SiTConfig(input_size, patch_size, in_channels,\n"
        "                            hidden_size, depth, num_heads, mlp_ratio,\n"
        "                            class_dropout_prob, num_classes, learn_sigma, 1))\n"
        "        self.blocks, self.patch_size = self.net.blocks, patch_size\n"
        "    def forward(self, x, t, y):\n"
        "        return self.net(x, t, y)\n")
    rows = bench.benchmark(torch.device("cpu"), quick=True, official_path=str(official))
    train = [r for r in rows if "mode" in r]
    assert [(r["mode"], r["sra2"], "official" in r["model"]) for r in train] == [
        ("fp32", False, False), ("fp32", True, False), ("bf16", False, False),
        ("bf16", True, False), ("fp32", False, True), ("fp32", True, True), ("bf16", False, True),
        ("bf16", True, True)]
    assert all(r["img_s"] > 0 and math.isfinite(r["img_s"]) for r in rows)
    assert all(r["tflops"] > 0 for r in train)
    assert "Euler-Maruyama" in capsys.readouterr().out


def test_flop_count_of_b2_and_projector_overhead():
    """fwd+bwd of SiT-B/2 is about 139 GFLOP per image (3 x 2 x 23.01 G multiply-adds)."""
    base = bench.train_flops_per_image(sra2.SiTConfig(**sra2.PRESETS["SiT-B/2"]), sra=False)
    with_p = bench.train_flops_per_image(sra2.SiTConfig(**sra2.PRESETS["SiT-B/2"]), sra=True)
    assert abs(base / 1e9 - 139) < 0.02 * 139
    # P: 5 layers of width 2D on 256 tokens, 3 x 2 x 256 x (2D^2 + 3 (2D)^2 + 2D x 16) multiply-adds
    D = 768
    projector = 6 * 256 * (D * 2 * D + 3 * (2 * D) ** 2 + 2 * D * 16)
    assert with_p - base == pytest.approx(projector, rel=0.01)


@pytest.mark.parametrize("argv, expected", [
    (["--device", "gpu"], "device 'gpu': expected cpu, cuda, cuda:N or mps"),
    (["--device", f"cuda:{torch.cuda.device_count()}"],
     f"device 'cuda:{torch.cuda.device_count()}': this machine has "
     f"{torch.cuda.device_count()} CUDA device(s)"),
    (["--official", "/nope/models.py"], "--official /nope/models.py: no such file"),
    (["--official", "README.md"], "--official README.md: not a Python file (SiT's models.py)"),
    (["--official", "TIMM"], "needs the Python module 'timm_is_not_installed_here' (SiT's "
                             "models.py imports timm: pip install timm)"),
    (["--official", "NOSIT"], "no class SiT in it (SiT's models.py)"),
    (["--flops"], "{flops} exists (the committed record); pass --overwrite to replace "
                  "it, or move it away"),
    (["--demo"], "{steps} exists (the committed record); pass --overwrite to replace it"),
])
def test_bench_bad_input_is_one_line_before_any_work(argv, expected, tmp_path, capsys,
                                                     monkeypatch):
    """Nothing timed, nothing written (results/flops.json, tracked, is kept byte for byte)."""
    monkeypatch.chdir(HERE)
    (tmp_path / "timm.py").write_text("import timm_is_not_installed_here\nclass SiT: pass\n")
    (tmp_path / "nosit.py").write_text("x = 1\n")
    argv = [{"TIMM": str(tmp_path / "timm.py"), "NOSIT": str(tmp_path / "nosit.py")}.get(a, a)
            for a in argv]
    flops, steps = HERE / "results" / "flops.json", HERE / "results" / "cpu_steps.json"
    before = flops.read_bytes(), steps.read_bytes()
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: pytest.fail("benchmark ran"))
    monkeypatch.setattr(bench, "train_flops_per_image", lambda *a: pytest.fail("counted"))
    monkeypatch.setattr(bench, "demo_steps", lambda *a: pytest.fail("timed"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("bench.py: error: ")
    assert expected.format(flops=flops, steps=steps) in err[0], err
    assert (flops.read_bytes(), steps.read_bytes()) == before


def test_bench_demo_times_every_demo_model_with_and_without_sra2_in_both_precisions(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "bench_train", lambda name, batch, mode, sra, device, kw, *a: seen.append(
        (kw["depth"], kw["hidden_size"], kw["input_size"], kw["in_channels"], batch, mode, sra))
        or dict(ms=1.0, low=1e-3, high=1e-3))
    rows = bench.demo_steps(torch.device("cpu"))
    assert len(rows) == len(seen) == len(set(seen)) == len(tiny_demo.DEMO_MODELS) * 4
    assert {(24, 64, 16, 4, 64, "bf16", True), (8, 128, 16, 4, 64, "fp32", False)} <= set(seen)
    assert {r["model"] for r in rows} == set(tiny_demo.DEMO_MODELS)


def test_bench_rows_show_their_spread_and_say_when_it_is_too_wide():
    assert bench.spread_note(0.010, 0.012) == "  10.0-12.0 ms"
    assert bench.spread_note(0.048, 3.708) == \
        "  48.0-3708.0 ms  spread 77.2x: too wide to read (a busy machine?)"
    assert "too wide" in bench.spread_note(0.010, 0.0151) and \
        "too wide" not in bench.spread_note(0.010, 0.0149)

