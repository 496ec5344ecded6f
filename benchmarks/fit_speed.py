"""Training speed: ppl_vae against hand-written PyTorch and Pyro-example loops, in one process.

    python benchmarks/fit_speed.py --data-dir ../shared/data [--epochs 3] [--device cpu]

On static binarized MNIST (50k), 784-400-20 MLP, batch 128, Bernoulli, Adam lr 1e-3, times
steady-state epochs (after one warm-up epoch) of

  (a)  ppl_vae's training loop (``Trainer``; --elbo trace and --elbo meanfield): the
       ``epoch_seconds`` it records, which covers the training steps only;
  (b)  a hand-written, well-optimized PyTorch VAE: data on the device, index batching,
       foreach/fused Adam, no per-step host sync;
  (c)  a textbook loop in the style of pytorch/examples' VAE: DataLoader over a
       TensorDataset, ``.item()`` every step;
  (d)  a loop in the style of Pyro's VAE example: ``SVI(model, guide, pyro.optim.Adam,
       Trace_ELBO())``, ``svi.step`` per batch from a DataLoader;

and prints seconds per epoch and the ratios a/b, a/c, a/d (targets on CPU: ≤ 1.15, < 1, ≤ 0.67).
"""
from __future__ import annotations

import argparse
import statistics
import sys
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

from ppl_vae.config import FitConfig  # noqa: E402
from ppl_vae.data import load_dataset  # noqa: E402
from ppl_vae.train import Trainer, read_metrics  # noqa: E402

B, LR = 128, 1e-3


def run_ppl_vae(ds, elbo, epochs, device):
    """(a): steady-state seconds per epoch of ppl_vae's own loop."""
    with tempfile.TemporaryDirectory() as out:
        cfg = FitConfig(dataset=ds.name, elbo=elbo, epochs=epochs + 1, batch_size=B, lr=LR, hidden=[400], z_dim=20,
                        device=str(device), final_iwae_k=0, log_every=100)
        trainer = Trainer(cfg, out, dataset=ds, quiet=True)
        trainer.run()
        secs = [m["epoch_seconds"] for m in read_metrics(Path(out))[1:]]
        return secs, read_metrics(Path(out))[-1]["valid_elbo"]


def run_handwritten(x, epochs, device):
    """(b): data on the device, index batching, foreach/fused Adam, no per-step sync."""
    vae = TorchVAE().to(device)
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.Adam(vae.parameters(), lr=LR, **impl)
    n = x.shape[0]

    def epoch():
        perm = torch.randperm(n, device=device)
        total = torch.zeros((), device=device)
        for i in range(0, n, B):
            loss = vae.neg_elbo(x[perm[i:i + B]], n / len(perm[i:i + B]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        return total

    return [timed(epoch, device)[0] for _ in range(epochs + 1)][1:]


def run_textbook(x, epochs, device):
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

    return [timed(epoch, device)[0] for _ in range(epochs + 1)][1:]


class _PyroExampleVAE(nn.Module):
    """Pyro's examples/vae/vae.py, abridged: softplus MLPs, Bernoulli(probs) decoder."""

    def __init__(self, z_dim=20, hidden=400):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden), nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.fc3, self.fc4 = nn.Linear(z_dim, hidden), nn.Linear(hidden, 784)
        self.softplus, self.sigmoid, self.z_dim = nn.Softplus(), nn.Sigmoid(), z_dim

    def model(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.sigmoid(self.fc4(self.softplus(self.fc3(z))))
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = self.softplus(self.fc1(x))
            pyro.sample("latent", dist.Normal(self.fc21(hidden), torch.exp(self.fc22(hidden))).to_event(1))


def run_pyro_example(x, epochs, device):
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

    return [timed(epoch, device)[0] for _ in range(epochs + 1)][1:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (default 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="a,b,c,d", help="subset of loops to run, e.g. a,b")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/*.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ds = load_dataset("binarized-mnist", args.data_dir)
    x = ds.train.to(device)
    pyro.enable_validation(False)  # as Pyro's examples do for speed; (a) switches it off itself
    which = set(args.only.split(","))
    med = {}
    runs = {"a_trace": lambda: run_ppl_vae(ds, "trace", args.epochs, device)[0],
            "a_meanfield": lambda: run_ppl_vae(ds, "meanfield", args.epochs, device)[0],
            "b_handwritten": lambda: run_handwritten(x, args.epochs, device),
            "c_textbook": lambda: run_textbook(x, args.epochs, device),
            "d_pyro_example": lambda: run_pyro_example(x, args.epochs, device)}
    for name, fn in runs.items():
        if name[0] not in which:
            continue
        torch.manual_seed(0)
        secs = fn()
        med[name] = statistics.median(secs)
        print(f"{name:<16} {med[name]:7.3f} s/epoch  (epochs: {', '.join(f'{s:.3f}' for s in secs)})", flush=True)
    ratios = {}
    for a in ("a_trace", "a_meanfield"):
        for ref in ("b_handwritten", "c_textbook", "d_pyro_example"):
            if a in med and ref in med:
                ratios[f"{a}/{ref[0]}"] = med[a] / med[ref]
    for k, v in ratios.items():
        print(f"{k:<16} {v:6.3f}")
    if not args.no_save:
        path = save_result("fit_speed", {"device": device_name(device), "device_kind": device.type,
                                         "torch": torch.__version__, "pyro": pyro.__version__,
                                         "epochs_timed": args.epochs, "seconds_per_epoch": med, "ratios": ratios,
                                         "command": "python benchmarks/fit_speed.py " + " ".join(argv or sys.argv[1:])})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
