"""Everything that needs a GPU, checked by one command on a CUDA machine.

    python benchmarks/gpu_check.py --data-dir DATA [--out DIR] [--skip graph,tests,speed] [--pytest-args ARGS]

1. CUDA-graph capture against eager execution: 200 training steps from the same seed, the
   same data and the same (capturable, fused) Adam, and parameter averaging (``--ema``) updated
   inside the step, once through :class:`ppl_vae.training.cuda_graph.GraphedStep` and once eagerly. Every
   step's loss and every final parameter and average must agree to 1e-5 relative; until they do,
   ``--cuda-graph`` stays opt-in; then every program family of :data:`PROGRAMS` (priors, guides,
   two layers, IWAE, warm-up, clipping, decay, averaging, AdamNormGrad, conv, conditional) trained two epochs
   through ``Trainer`` captured and eager: every metric of every epoch must agree to 1e-5 relative;
2. the test suite with the ``device`` fixture on ``cuda`` (``PPL_VAE_TEST_DEVICES=cuda``;
   tests without the fixture run as usual, and ``--device auto`` picks the GPU in CLI tests);
   ``--pytest-args '-q -k cuda -n 8'`` runs only the CUDA cases, on 8 workers;
3. ``benchmarks/fit_speed.py`` and ``benchmarks/eval_speed.py`` on the GPU;

and writes ``gpu-check-<device>.json`` (device name, torch/CUDA versions, each part's outcome)
under ``--out`` (default ``benchmarks/results``), rewritten after each part, each subprocess part
stopped after ``--part-timeout`` seconds. Exit code 0 only when every part passed.
How to carry pyro-ppl, ArviZ and the data to a GPU machine without internet:
``docs/benchmarks.md``, "Checking a GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict | None = None, timeout: int = 1800, echo: bool = True) -> dict:
    """Run a command; its exit code (124 when it ran past ``timeout`` seconds), seconds and last lines."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (
            e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        ) + f"\n(timed out after {timeout} s)"
    if echo:
        sys.stdout.write(out[-30000:])
        sys.stderr.write(err[-2000:])
        sys.stdout.flush()
    return {
        "command": " ".join(cmd),
        "returncode": code,
        "seconds": round(time.perf_counter() - t0, 1),
        "tail": (out + err).strip().splitlines()[-15:],
    }


def graph_vs_eager(steps: int = 200, batch: int = 128, seed: int = 0, rtol: float = 1e-5) -> dict:
    """Losses of ``steps`` training steps and the final parameters, captured vs eager."""
    import pyro

    from ppl_vae.inference.objectives import make_objective
    from ppl_vae.programs.model import VAE
    from ppl_vae.training.averaging import ParameterAverage
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.cuda_graph import GraphedStep
    from ppl_vae.training.optim import make_optimizer
    from ppl_vae.training.train import train_step

    device = torch.device("cuda")
    pyro.enable_validation(False)
    g = torch.Generator(device="cpu").manual_seed(1234)
    x = (torch.rand(steps * batch, 784, generator=g) < 0.13).float().to(device)  # (S·B, 784) binary images

    def trajectory(graphed: bool):
        pyro.set_rng_seed(seed)
        vae = VAE((1, 28, 28), z_dim=20, hidden=[400]).to(device)
        vae.register_params = False
        optim = make_optimizer(vae.parameters(), FitConfig(), device, capturable=True)
        objective = make_objective("trace")
        average = ParameterAverage(vae, 0.99)

        def loss_fn(batch, size, beta):
            return objective(vae.model, vae.guide, *batch, size=size, beta=beta)

        def step(idx, beta, weight=1.0):
            loss = train_step(loss_fn, optim, vae.parameters(), (x[idx],), x.shape[0], beta)
            average.update()
            return loss

        step_fn = GraphedStep(step, device) if graphed else step
        torch.manual_seed(seed + 1)  # the ε stream of the steps
        losses = []
        for i in range(steps):
            idx = torch.arange(i * batch, (i + 1) * batch, device=device)
            losses.append(step_fn(idx, 1.0).clone())  # a replay overwrites its static loss: copy it
        torch.cuda.synchronize()
        captured = bool(getattr(step_fn, "graphs", None))
        params = [p.detach().clone() for p in (*vae.parameters(), *average.model.parameters())]
        return torch.stack(losses), params, captured

    eager_loss, eager_params, _ = trajectory(False)
    graph_loss, graph_params, captured = trajectory(True)
    loss_err = ((graph_loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12)).max().item()
    param_err = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        for a, b in zip(graph_params, eager_params)
    )
    ok = captured and loss_err <= rtol and param_err <= rtol
    print(
        f"graph vs eager, {steps} steps: captured={captured}, max relative loss error {loss_err:.2e}, "
        f"max relative parameter error {param_err:.2e} (tolerance {rtol:g}): {'PASS' if ok else 'FAIL'}"
    )
    return {
        "steps": steps,
        "captured": captured,
        "max_rel_loss_error": loss_err,
        "max_rel_param_error": param_err,
        "rtol": rtol,
        "returncode": 0 if ok else 1,
    }


PROGRAMS = {  # one of each program family and training option that a captured step must reproduce
    "vae": {},
    "vampprior-iaf": {"prior": "vampprior", "guide": "iaf", "pseudo_inputs": 50},
    "two-layer-skip-ema": {"latent_layers": 2, "hierarchy": "skip", "ema": 0.999, "activation": "gated"},
    "adam-normgrad": {"optimizer": "adam-normgrad", "prior": "vampprior", "pseudo_inputs": 50},
    "iwae5-warmup": {"elbo": "iwae", "num_particles": 5, "kl_warmup": 1.0},
    "full-rank-clip-decay": {"guide": "full-rank", "grad_clip": 100.0, "lr_decay": 0.9, "beta": 2.0},
    "mog-meanfield": {"prior": "mog", "elbo": "meanfield"},
    "conv-gaussian-learned": {"arch": "conv", "likelihood": "gaussian-learned"},
    "conditional": {"conditional": True},
}


def program_captured_vs_eager(name: str, data_dir: str | None, epochs: int = 2) -> dict:
    """:data:`PROGRAMS` ``name`` trained ``epochs`` epochs on the MNIST test images (greyscale;
    8k/1k/1k split) through ``Trainer``, eager and then captured; the largest relative difference of
    any metric of any epoch. Run in a process of its own (``--program NAME``): a failed capture
    leaves the CUDA generator unusable for the rest of the process."""
    import tempfile

    from ppl_vae.data.datasets import load_dataset
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    ds = load_dataset("mnist-t10k", data_dir)
    rows = {}
    for graphed in (False, True):
        with tempfile.TemporaryDirectory() as out:
            cfg = FitConfig(
                dataset=ds.name,
                epochs=epochs,
                device="cuda",
                cuda_graph=graphed,
                final_iwae_k=0,
                **PROGRAMS[name],
            )
            trainer = Trainer(cfg, out, dataset=ds, quiet=True)
            trainer.run()
            rows[graphed] = [
                json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            ]
    keys = [k for k, v in rows[False][0].items() if isinstance(v, float) and "seconds" not in k and k != "lr"]
    err = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(rows[False], rows[True]) for k in keys)
    return {
        "max_rel_metric_error": err,
        "eager_s": sum(r["epoch_seconds"] for r in rows[False]),
        "graph_s": sum(r["epoch_seconds"] for r in rows[True]),
    }


def graph_programs(data_dir: str | None, rtol: float = 1e-5, timeout: int = 300) -> dict:
    """Every program family of :data:`PROGRAMS`, captured against eager, each in its own process:
    every metric of every epoch must agree to ``rtol``, relative."""
    results, ok = {}, True
    for name in PROGRAMS:
        r = run(
            [sys.executable, __file__, "--program", name, *(["--data-dir", data_dir] if data_dir else [])],
            timeout=timeout,
            echo=False,
        )
        found = [line for line in r["tail"] if line.startswith("{")]
        result = json.loads(found[-1]) if r["returncode"] == 0 and found else {"error": r["tail"][-3:]}
        good = result.get("max_rel_metric_error", float("inf")) <= rtol
        ok &= good
        results[name] = result
        detail = (
            (
                f"max relative metric error {result['max_rel_metric_error']:.1e}, epoch seconds eager "
                f"{result['eager_s']:.2f}, graphed {result['graph_s']:.2f}"
            )
            if "error" not in result
            else f"{result['error']}"
        )
        print(f"{name:<24} {detail}: {'PASS' if good else 'FAIL'}", flush=True)
    return {"programs": results, "rtol": rtol, "returncode": 0 if ok else 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("PPL_VAE_DATA"), help="the shared data folder")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON report")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: graph, programs, tests, speed")
    p.add_argument(
        "--pytest-args",
        default="-q -x -p no:cacheprovider",
        help="arguments of the test part, e.g. '-q -k cuda -n 8' for the CUDA cases on 8 workers",
    )
    p.add_argument(
        "--program", choices=list(PROGRAMS), help=argparse.SUPPRESS
    )  # one family, in its own process
    p.add_argument("--part-timeout", type=int, default=1800, help="seconds each subprocess part may run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device is available; run this on a CUDA machine", file=sys.stderr)
        return 2
    if args.program:
        print(json.dumps(program_captured_vs_eager(args.program, args.data_dir)))
        return 0
    skip = set(filter(None, args.skip.split(",")))
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    env = {"PPL_VAE_TEST_DEVICES": "cuda", **({"PPL_VAE_DATA": args.data_dir} if args.data_dir else {})}
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parts": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{report['device'].replace(' ', '-').lower()}.json"

    def record(name, result):  # the report is rewritten after every part: a later hang loses nothing
        report["parts"][name] = result
        report["passed"] = all(part["returncode"] == 0 for part in report["parts"].values())
        path.write_text(json.dumps(report, indent=2) + "\n")

    py, limit = sys.executable, args.part_timeout
    if "graph" not in skip:
        try:
            record("graph_vs_eager", graph_vs_eager())
        except Exception as e:  # noqa: BLE001 - a crash is a failed part, and the other parts still run
            record("graph_vs_eager", {"returncode": 1, "error": f"{e.__class__.__name__}: {e}"[:2000]})
            print(f"graph vs eager: FAIL ({e.__class__.__name__}: {e})", flush=True)
    if "programs" not in skip:
        record("graph_programs", graph_programs(args.data_dir, timeout=limit))
    if "tests" not in skip:
        record("tests", run([py, "-m", "pytest", *args.pytest_args.split()], env, limit))
    if "speed" not in skip:
        record(
            "fit_speed",
            run([py, "benchmarks/fit_speed.py", *data, "--epochs", "3", "--device", "cuda"], timeout=limit),
        )
        record("eval_speed", run([py, "benchmarks/eval_speed.py", *data, "--device", "cuda"], timeout=limit))
    print(f"gpu_check: {'PASSED' if report['passed'] else 'FAILED'}; report in {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
