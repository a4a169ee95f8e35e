"""The first stage of search, trained in PyTorch: what ``runtime.index`` / ``runtime.search`` use
to shortlist a gallery before IMRAM re-ranks it exactly (docs/search.md).

* ``global_head``: a small head distilled from a trained IMRAM (``python -m
  imram_min.search.global_head RUN/best.pt --data DIR``), one vector per image and per caption.
* ``shortlist``: the shortlist-then-re-rank retrieval metrics in PyTorch
  (``python -m imram_min.evaluate --shortlist``).

Not part of the method: IMRAM itself scores every pair it is given (imram_min/model.py).
"""
