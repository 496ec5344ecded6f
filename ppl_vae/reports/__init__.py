"""What a trained program is worth, in numbers and pictures: the whole held-out evaluation
(:mod:`.evaluation`) and its table (:mod:`.report`), active units (:mod:`.latents`), each
layer's KL and posterior collapse (:mod:`.collapse`), figures (:mod:`.plots`) and TensorBoard
events (:mod:`.tensorboard_log`).

May import: ``core``, ``data``, ``programs``, ``inference``.
"""
