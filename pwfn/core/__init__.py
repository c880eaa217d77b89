"""The algorithm: tensors in, tensors out, nothing about models, training or files.

- :mod:`~pwfn.core.centres`   the power-of-two candidate values and their digits;
- :mod:`~pwfn.core.engine`    one greedy fixing round (:func:`~pwfn.core.engine.fix_round`), its
  fast path :mod:`~pwfn.core._engine_fast` and its executable specification
  :mod:`~pwfn.core.engine_reference`;
- :mod:`~pwfn.core.sharding`  a round over the shards of a network-wide vector (FSDP);
- :mod:`~pwfn.core.wfn_published` the published WFN clustering;
- :mod:`~pwfn.core.schedules` how much is fixed each round;
- :mod:`~pwfn.core.metrics`   counts, entropy and size of a fixed network;
- :mod:`~pwfn.core.regularizers` the WFN pull towards the candidate values.

``bayes`` (the Bayesian layers) is the other package of this layer.
"""
