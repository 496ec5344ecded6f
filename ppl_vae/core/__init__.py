"""Plumbing every layer may use, with no machine learning in it: errors (:mod:`.errors`), atomic
file writes (:mod:`.files`), the command-line conventions (:mod:`.cli`: one line and an exit
code for bad input, faults and signals), seeds of independent random streams (:mod:`.seeding`)
and the ``torchrun`` process group (:mod:`.distributed`).

May import: nothing of ppl_vae outside ``core``.
"""
