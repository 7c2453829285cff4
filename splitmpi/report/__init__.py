"""Tables and figures from splitmpi results files (one HDF5 file per run):
``python -m splitmpi.report``.

Post-processing runs where the training does not, on laptops and login nodes: everything
here needs only h5py and numpy, and matplotlib for figures; torch is imported for the
``--wire`` figure alone (tests/test_report.py proves it). One module a subject:

- ``training``: what the training runs measured (the papers' tables, traffic, the audit);
- ``attacks``: what the inversion attacks recovered (``/attack/<method>`` groups);
- ``wire``: what crosses the wire, drawn from a network (the one that needs torch);
- ``render``: a ``Table`` as aligned text, CSV or Markdown; ``plotting``: what every
  figure shares;
- ``cli``: the command, and the ``TABLES`` and ``PLOTS`` lists it draws from.

Unfinished runs (no ``finished`` attribute) are read up to their last written epoch and
carry ``status: unfinished``; they are never averaged together with finished runs.
"""
