"""Fixing rounds inside other trainers (optional extras): ``pwfn.integrations.lightning`` for
PyTorch Lightning, ``pwfn.integrations.huggingface`` for the Hugging Face ``Trainer``.

Both drive a :class:`pwfn.Fixer`: the first round is fixed when training starts, the next one
every ``epochs_per_round`` epochs, and training stops once the last round has fixed every weight.
"""
