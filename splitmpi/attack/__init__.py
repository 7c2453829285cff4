"""Feature-inversion and model-completion attacks on a trained split model:
``python -m splitmpi.attack``.

The curious server sees what crosses the cut for each image (the extractor's activation
after the client's defense) and tries to rebuild the image. The package follows one attack
from start to end, a module a step:

- ``target``: the extractor under attack and the utility of its model, from
  ``attack.checkpoint`` (a file, or a run's results file or checkpoints) or trained here;
- ``images``: the evaluated images and the auxiliary images the attacker holds;
- ``decoder`` and ``rmle``: the two inversion methods, one module each; ``completion``:
  model completion, a head on the run's cloud from a few known labels;
- ``metrics``: how close a reconstruction comes (MSE, PSNR, SSIM, the paper's score);
- ``output``: the ``/attack/<method>`` group of a splitmpi results file;
- ``cli``: the command, which validates the settings and runs the steps in order.

The report reads the written groups back with h5py alone (``splitmpi.report.attacks``), so
post-processing imports nothing of this package but for the ``--wire`` figure;
docs/privacy.md has the details.
"""
