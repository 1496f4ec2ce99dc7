"""Downstream uses of a trained Exemplar VAE (the CLI is ``uses.py`` at the repo root).

* :mod:`exvae.uses.generation`: exemplar-conditioned, unconditional and cyclic
  generation, latent interpolation, augmented images (explicit keys) and PNG writers.
* :mod:`exvae.uses.knn`: kNN classification on encoder means.
* :mod:`exvae.uses.classifier`: the paper's MLP classifier, its training and its
  grey-level data (also the kNN's).
* :mod:`exvae.uses.augment`: generative data augmentation for that classifier.
* :mod:`exvae.uses.plots`: t-SNE of latent codes, training curves.
* :mod:`exvae.uses.commands`: the ``uses.py`` commands, callable in-process.

The exemplar bank these build on is :mod:`exvae.bank`.
"""
