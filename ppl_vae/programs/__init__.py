"""The generative programs: the VAE as a Pyro ``model``/``guide`` pair (:mod:`.model`), its
priors (:mod:`.priors`), posterior families (:mod:`.guides`), networks (:mod:`.nets`),
likelihoods (:mod:`.likelihoods`) and the class-conditional VAE (:mod:`.conditional`).

May import: ``core``.
"""
