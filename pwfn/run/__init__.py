"""Runs and their folders: compress, experiments from a config, and what a run leaves on disk.

- :mod:`~pwfn.run.pipeline`   :func:`~pwfn.run.pipeline.compress` and the fixing run behind it;
- :mod:`~pwfn.run.experiment` ``pwfn run`` / ``pwfn compare``: a run from a config alone;
- :mod:`~pwfn.run.manifest`   the run folder's manifest and every check on reading its files;
- :mod:`~pwfn.run.fingerprints` what a run was made from, and the refusal to resume under other inputs;
- :mod:`~pwfn.run.lock`       one writer per run folder;
- :mod:`~pwfn.run.runlog`     round logs beside ``metrics.jsonl`` (CSV, the one-line summary, TensorBoard);
- :mod:`~pwfn.run.rundata`    reading a run folder's results back;
- :mod:`~pwfn.run.ownership`  which folders and files a run may replace (those pwfn provably wrote);
- :mod:`~pwfn.run.report`     the text reports (``pwfn report``, the comparison table).

The package :mod:`pwfn.export` sits beside this folder in the same layer.
"""
