"""Model plumbing and settings: what is fixed in a network, how, and how a run describes it.

- :mod:`~pwfn.model.coverage` which tensors a method quantises (and why others stay float);
- :mod:`~pwfn.model.plumbing` :class:`~pwfn.model.plumbing.QuantView`, the flat view the engine fixes;
- :mod:`~pwfn.model.zoo`      the built-in models by name (``create_model``, ``register_model``);
- :mod:`~pwfn.model.recipes`  how a file names the model it was made from, and rebuilds it;
- :mod:`~pwfn.model.config`   the run settings (:class:`~pwfn.model.config.RunConfig`), loaded and checked;
- :mod:`~pwfn.model.presets`  the shipped run configs, usable by name (``digits_mlp``, ...).
"""
