"""Presentation of evaluation results (the protocols themselves are :mod:`selfsup.evaluate`).

- :mod:`selfsup.report.report`: ``report.html`` of one run; :mod:`selfsup.report.compare`: ``compare.html``.
- :mod:`selfsup.report.plots`: training curves; :mod:`selfsup.report.embedding_map`: t-SNE/UMAP maps.
- :mod:`selfsup.report.html`: the HTML kit both pages share.
"""
