"""Inference for any Pyro ``model``/``guide`` pair: the training objectives (:mod:`.objectives`),
the held-out estimators (:mod:`.estimators`: ELBOs, IWAE_K, their standard errors; annealed
importance sampling with HMC transitions, :mod:`.ais` and :mod:`.hmc`, and bidirectional Monte
Carlo, :mod:`.bdmc`), the importance weights behind them (:mod:`.importance`, :mod:`.replay`),
the checks of a user's program and its data (:mod:`.checks`, :mod:`.inputs`) and Pareto k̂ (:mod:`.psis`).

May import: ``core``. (Generic over programs: it never imports ``programs``.)
"""
