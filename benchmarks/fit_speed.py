"""Training speed: ppl_vae against hand-written PyTorch and Pyro-example loops, in one process.

    python benchmarks/fit_speed.py --data-dir ../shared/data [--epochs 5] [--device cpu]

On static binarized MNIST (50k), 784-400-20 MLP, batch 128, Bernoulli, Adam lr 1e-3, times
steady-state epochs (after one warm-up epoch) of

  (a)  ppl_vae's training loop (``Trainer``; --elbo trace and --elbo meanfield): the
       ``epoch_seconds`` it records, which covers the training steps only;
  (b)  a hand-written, well-optimized PyTorch VAE: data on the device, index batching,
       fused Adam, no per-step host sync;
  (c)  a textbook loop in the style of pytorch/examples' VAE: DataLoader over a
       TensorDataset, ``.item()`` every step;
  (d)  a loop in the style of Pyro's VAE example: ``SVI(model, guide, pyro.optim.Adam,
       Trace_ELBO())``, ``svi.step`` per batch from a DataLoader;

and prints seconds per epoch and the ratios a/b, a/c, a/d (targets on CPU: ≤ 1.15, < 1, ≤ 0.67).
It also times (b) with ppl_vae's own Bernoulli log-density (``b_own_density``): ppl_vae's
Bernoulli avoids a slow PyTorch CPU kernel (log1p), and a/b_own_density is what the Pyro
program costs with that advantage taken away.

``--base REV`` also trains ppl_vae as of git revision REV in the same process (the package
extracted by ``git archive`` and imported as ``ppl_vae_base``), its epochs interleaved with the
others, and prints a/a_base: what a change costs the training loop, free of the minute-to-minute
drift of a shared machine that separate runs suffer.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TorchVAE, device_name, save_result, timed  # noqa: E402

from ppl_vae.data.datasets import load_dataset  # noqa: E402
from ppl_vae.training.config import FitConfig  # noqa: E402
from ppl_vae.training.train import Trainer  # noqa: E402

B, LR = 128, 1e-3
REPO = Path(__file__).resolve().parents[1]


def ppl_vae_loop(ds, elbo, device, out, package=None, cuda_graph=False):
    """(a): each call trains one more epoch with ppl_vae's own loop (``Trainer.run``) and returns
    the ``epoch_seconds`` it records, which covers the training steps only. ``package``: another
    version of ppl_vae (:func:`base_package`) instead of this one; ``cuda_graph``: ``--cuda-graph``
    (each step replayed from a captured CUDA graph; CUDA only)."""
    config, train = (
        (FitConfig, Trainer)
        if package is None
        else (_base_module(package, "config").FitConfig, _base_module(package, "train").Trainer)
    )
    cfg = config(
        dataset=ds.name,
        elbo=elbo,
        epochs=1,
        batch_size=B,
        lr=LR,
        hidden=[400],
        z_dim=20,
        device=str(device),
        final_iwae_k=0,
        log_every=100,
        **({"cuda_graph": True} if cuda_graph else {}),
    )
    trainer = train(cfg, out, dataset=ds, quiet=True)

    def epoch():
        trainer.cfg.epochs = trainer.state.epoch + 1
        trainer.run()
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["epoch_seconds"]

    return epoch


def _base_module(package, name: str):
    """``package.training.NAME`` (the layout since 0.3), else the flat ``package.NAME`` of older revisions."""
    try:
        return importlib.import_module(f"{package.__name__}.training.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"{package.__name__}.{name}")


def base_package(rev: str, into: str):
    """ppl_vae as of git revision ``rev``, imported as the package ``ppl_vae_base`` from ``into``
    (its modules import each other relatively), so that two versions train in one process."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "ppl_vae"], capture_output=True, check=True
    )
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(into)
    os.rename(os.path.join(into, "ppl_vae"), os.path.join(into, "ppl_vae_base"))
    sys.path.insert(0, into)
    return importlib.import_module("ppl_vae_base")


def handwritten_loop(x, device, own_density=False):
    """(b): data on the device, index batching, fused Adam, no per-step sync.
    ``own_density``: (b) with ppl_vae's Bernoulli log-density in place of PyTorch's BCE."""
    vae = TorchVAE(own_density=own_density).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=LR, fused=True)  # the fastest Adam on CPU and CUDA alike
    n = x.shape[0]

    def epoch():
        perm = torch.randperm(n, device=device)
        total = torch.zeros((), device=device)
        for i in range(0, n, B):
            loss = vae.neg_elbo(x[perm[i : i + B]], n / len(perm[i : i + B]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        return total

    return lambda: timed(epoch, device)[0]


def textbook_loop(x, device):
    """(c): pytorch/examples style: DataLoader, default Adam, ``loss.item()`` each step."""
    vae = TorchVAE().to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x.cpu()), batch_size=B, shuffle=True)

    def epoch():
        train_loss = 0.0
        for (data,) in loader:
            data = data.to(device)
            opt.zero_grad()
            loss = vae.neg_elbo(data)
            loss.backward()
            train_loss += loss.item()
            opt.step()
        return train_loss

    return lambda: timed(epoch, device)[0]


class _PyroExampleVAE(nn.Module):
    """Pyro's examples/vae/vae.py, abridged: softplus MLPs, Bernoulli(probs) decoder."""

    def __init__(self, z_dim=20, hidden=400):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (
            nn.Linear(784, hidden),
            nn.Linear(hidden, z_dim),
            nn.Linear(hidden, z_dim),
        )
        self.fc3, self.fc4 = nn.Linear(z_dim, hidden), nn.Linear(hidden, 784)
        self.softplus, self.sigmoid, self.z_dim = nn.Softplus(), nn.Sigmoid(), z_dim

    def model(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.sigmoid(self.fc4(self.softplus(self.fc3(z))))
            pyro.sample(
                "obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784)
            )

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = self.softplus(self.fc1(x))
            pyro.sample("latent", dist.Normal(self.fc21(hidden), torch.exp(self.fc22(hidden))).to_event(1))


def pyro_example_loop(x, device):
    """(d): SVI + pyro.optim.Adam + Trace_ELBO, ``svi.step`` per DataLoader batch."""
    pyro.clear_param_store()
    vae = _PyroExampleVAE().to(device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), loss=Trace_ELBO())
    loader = DataLoader(TensorDataset(x.cpu()), batch_size=B, shuffle=True)

    def epoch():
        loss = 0.0
        for (data,) in loader:
            loss += svi.step(data.to(device))
        return loss

    return lambda: timed(epoch, device)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="timed epochs of each loop after one warm-up epoch, interleaved across the loops (default 5)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="a,b,c,d", help="subset of loops to run, e.g. a,b")
    p.add_argument(
        "--base",
        default=None,
        metavar="REV",
        help="also time ppl_vae as of git revision REV "
        "(a_trace_base, a_meanfield_base), interleaved in this process: a/a_base is the change's cost",
    )
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ds = load_dataset("binarized-mnist", args.data_dir)
    x = ds.train.to(device)
    pyro.enable_validation(False)  # as Pyro's examples do for speed; (a) switches it off itself
    which = set(args.only.split(","))
    factories = {
        "a_trace": lambda: ppl_vae_loop(ds, "trace", device, tmp.name + "/trace"),
        "a_meanfield": lambda: ppl_vae_loop(ds, "meanfield", device, tmp.name + "/meanfield"),
        **(
            {"a_trace_graph": lambda: ppl_vae_loop(ds, "trace", device, tmp.name + "/graph", cuda_graph=True)}
            if device.type == "cuda"
            else {}
        ),
        "b_handwritten": lambda: handwritten_loop(x, device),
        "b_own_density": lambda: handwritten_loop(x, device, own_density=True),
        "c_textbook": lambda: textbook_loop(x, device),
        "d_pyro_example": lambda: pyro_example_loop(x, device),
    }
    tmp = tempfile.TemporaryDirectory()
    if args.base:
        base = base_package(args.base, tmp.name + "/base")
        for elbo in ("trace", "meanfield"):
            if "a" in which:
                factories[f"a_{elbo}_base"] = (
                    lambda e: lambda: ppl_vae_loop(ds, e, device, f"{tmp.name}/{e}-base", base)
                )(elbo)
    loops = {}
    for name, make in factories.items():
        if name[0] in which:
            torch.manual_seed(0)
            loops[name] = make()
    # Epochs interleaved (a b c d, then d c b a, ...): a slow spell of a shared machine hits every
    # loop alike instead of whichever happened to run then. Epoch 0 of each loop is a warm-up.
    secs = {name: [] for name in loops}
    for r in range(args.epochs + 1):
        for name in list(loops) if r % 2 == 0 else reversed(list(loops)):
            secs[name].append(loops[name]())
    tmp.cleanup()
    med = {}
    for name, t in secs.items():
        med[name] = statistics.median(t[1:])
        print(
            f"{name:<16} {med[name]:7.3f} s/epoch  (epochs: {', '.join(f'{v:.3f}' for v in t[1:])})",
            flush=True,
        )
    ratios = {}
    for a in ("a_trace", "a_meanfield", "a_trace_graph"):
        for ref, tag in (
            ("b_handwritten", "b"),
            ("c_textbook", "c"),
            ("d_pyro_example", "d"),
            ("b_own_density", "b_own_density"),
        ):
            if a in med and ref in med:
                ratios[f"{a}/{tag}"] = med[a] / med[ref]
    for a in ("a_trace", "a_meanfield"):
        if f"{a}_base" in med:
            ratios[f"{a}/{a}_base"] = med[a] / med[f"{a}_base"]
    for k, v in ratios.items():
        print(f"{k:<16} {v:6.3f}")
    if not args.no_save:
        path = save_result(
            "fit_speed",
            {
                "device": device_name(device),
                "device_kind": device.type,
                "torch": torch.__version__,
                "pyro": pyro.__version__,
                "epochs_timed": args.epochs,
                "base": args.base,
                "seconds_per_epoch": med,
                "ratios": ratios,
                "command": "python benchmarks/fit_speed.py " + " ".join(argv or sys.argv[1:]),
            },
        )
        print(f"saved {path}")


if __name__ == "__main__":
    main()
