"""Training while fixing: the Fixer, the accuracy contract and the loops and tasks around them.

- :mod:`~pwfn.training.fixer`   :class:`~pwfn.training.fixer.Fixer`, the rounds inside any training
  loop; its contract evaluation :mod:`~pwfn.training.guard` and rounds
  :mod:`~pwfn.training.contract_rounds`;
- :mod:`~pwfn.training.contract` the accuracy contract (:class:`~pwfn.training.contract.AccuracyContract`);
- :mod:`~pwfn.training.tasks`   what a batch is and how a model is scored (tasks and metrics);
- :mod:`~pwfn.training.train`   the built-in training loop and its helpers;
- :mod:`~pwfn.training.budget`  fixing to a size budget;
- :mod:`~pwfn.training.checks`  the checks made before anything is written;
- :mod:`~pwfn.training.distributed` data-parallel and multi-node runs.

The packages :mod:`pwfn.methods`, :mod:`pwfn.integrations` and :mod:`pwfn.data` sit beside this
folder in the same layer.
"""
