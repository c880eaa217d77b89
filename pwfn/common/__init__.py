"""The bottom layer: what every other layer may use and that knows nothing about fixing.

- :mod:`~pwfn.common.io`      crash-safe file writing and versioned checkpoints;
- :mod:`~pwfn.common.files`   bounded reads of files and JSON;
- :mod:`~pwfn.common.catalog` the registered model names, for ``pwfn models`` without importing torch;
- :mod:`~pwfn.common.hints`   what a message tells the user to do: settings, commands, install lines;
- :mod:`~pwfn.common.console` what a terminal shows: progress bars and log lines;
- :mod:`~pwfn.common.moved`   the module paths before the layer folders, still importable for a release.

The error types sit beside, in :mod:`pwfn.errors` (public: users catch them).
"""
