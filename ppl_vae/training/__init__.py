"""Training: the settings of a run (:mod:`.config`, checked by :mod:`.config_checks`), the loop
and its one-screen step (:mod:`.train`), a run's start and end (:mod:`.start`, :mod:`.finish`),
checkpoints and run directories (:mod:`.checkpoint`, :mod:`.runs`), validation
(:mod:`.validation`), the optimizer and β schedule (:mod:`.optim`), parameter averaging
(:mod:`.averaging`), signals (:mod:`.interrupts`) and CUDA graphs (:mod:`.cuda_graph`).

May import: ``core``, ``data``, ``programs``, ``inference``, ``reports``.
"""
