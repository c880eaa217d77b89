"""Export a fixed network: a plain point-estimate model, a packed artefact, and their sizes.

Why a separate step: a fixing run leaves a Bayesian (or masked) training model behind. What
a user ships is (1) plain torch layers holding mu, loadable without ``bayes``; (2) the
compressed form whose size the metrics promise, i.e. the shared power-of-two codebook plus
entropy-coded indices; and (3) optionally formats other runtimes run (ONNX, TFLite-Micro, hls4ml).

One module per idea:

- :mod:`~pwfn.export.artefact` what an artefact holds (sharing, fixed values, split tensors),
  building and verifying it in memory, and the loaders;
- :mod:`~pwfn.export.packing`  the packed ``.pwfn`` byte format;
- :mod:`~pwfn.export.codec`    its codecs: varints, symbol tables, ANS and fixed-width coding;
- :mod:`~pwfn.export.packcheck` what a packed file may claim, checked before anything is decoded;
- :mod:`~pwfn.export.size`     the size report (``size.json``);
- :mod:`~pwfn.export.folder`   the export folder, written at once, and reading a run folder;
- :mod:`~pwfn.export.ownership` which folders an export may replace (those pwfn provably wrote);
- :mod:`~pwfn.export.targets`  the device targets (``pwfn export RUN --to onnx,tflm,hls4ml``);
- :mod:`~pwfn.export.hub`      ``from_pretrained`` and the model card; :mod:`~pwfn.export.share`
  ``save_pretrained``.

How a model is rebuilt from a file is :mod:`pwfn.model.recipes`.

The text that ``pwfn export`` prints is formatted by :mod:`pwfn.run.report`. A run must be 100 %
fixed; with ``allow_unfixed`` the remaining values are kept as raw floats and the artefact says
so. Loading needs only torch, safetensors, numpy and constriction (``export_model`` and
``export_run``, which need ``bayes``, load on first use); the optional toolchains are imported
only by the targets that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ArtefactError
from . import packing
from .artefact import (
    EXPORT_DIR,
    EXPORT_FORMAT,
    MODEL_FILE,
    MODEL_JSON,
    ONNX_FILE,
    PACKED_FILE,
    SIZE_FILE,
    STAGE_SUFFIX,
    ExportError,
    load_exported_model,
    load_packed_model,
    reassemble,
    shared_keys,
)
from .size import size_summary

__all__ = [
    "EXPORT_DIR",
    "EXPORT_FORMAT",
    "MODEL_FILE",
    "MODEL_JSON",
    "ONNX_FILE",
    "PACKED_FILE",
    "SIZE_FILE",
    "STAGE_SUFFIX",
    "ArtefactError",
    "ExportError",
    "export_model",
    "export_run",
    "load_exported_model",
    "load_packed_model",
    "packing",
    "reassemble",
    "shared_keys",
    "size_summary",
]

#: writing an export needs ``bayes`` (and so pyro); loading never does: these load on first use
_LAZY = {"export_model": "folder", "export_run": "folder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
