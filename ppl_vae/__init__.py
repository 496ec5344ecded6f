"""ppl_vae: variational autoencoders as Pyro programs, trained fast and evaluated honestly.

The public API, from Python::

    from ppl_vae import VAE, load_dataset, fit, evaluate, estimators

    run = fit(dataset="digits", out="runs/digits", epochs=20)    # as python -m ppl_vae.fit
    report = evaluate(run.model.model, run.model.guide, load_dataset("digits").test, num_samples=1000)
    print(report.table())

``fit`` and ``evaluate`` are also the command-line modules (``python -m ppl_vae.fit``); called,
they are :func:`ppl_vae.fit.fit` and :func:`ppl_vae.reports.evaluation.evaluate`. The layers
are subpackages (``core``, ``data``, ``programs``, ``inference``, ``reports``, ``training``; the
table in docs/index.md). Names load on first use, so ``python -m ppl_vae.fit`` starts without
importing torch before it can handle a Ctrl-C.
"""

__version__ = "0.1.0"

_LAZY = {
    "VAE": ("ppl_vae.programs.model", "VAE"),
    "load_dataset": ("ppl_vae.data", "load_dataset"),
    "Dataset": ("ppl_vae.data", "Dataset"),
    "FitConfig": ("ppl_vae.training.config", "FitConfig"),
}
__all__ = ["VAE", "load_dataset", "Dataset", "FitConfig", "fit", "evaluate", "sample", "estimators"]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("fit", "evaluate", "sample", "estimators"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
