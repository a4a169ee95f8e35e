"""Engineering: what runs the method at scale and keeps its commands safe, not the method itself.

A reader learning IMRAM can skip this folder: imram_min/model.py, loss.py, fast.py, train.py,
evaluate/ and data/ state what is computed; these files decide how and where.

* ``tiling``: the one tiler of the (n_img, n_cap) pair matrix (blocks, threads, devices).
* ``distributed``: training and scoring on many processes (exact global-batch loss, gloo/NCCL).
* ``checkpoint``: saving and loading runs (atomic, ``weights_only=True``).
* ``settings``: the training command's settings and flags.
* ``checks``: up-front checks of every training-side command's inputs.
* ``convert``: original IMRAM checkpoints -> this project's (``python -m imram_min.engineering.convert``).
* ``plots``: the notebooks' figures.
"""
