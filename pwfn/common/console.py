"""What a person at a terminal sees while pwfn works: progress bars and log lines.

- :func:`progress_bar` is every progress bar of pwfn (the rounds of a method, the training epochs
  between them, the float baseline): shown only when asked (the config's ``progress``, on by
  default; ``--no-progress``) *and* standard error is a terminal, so log files, CI output and
  pipes stay clean; erased when done.
- :func:`enable_logging` is the one-call opt-in for Python users to see pwfn's log: the INFO line
  each round ends with, the coverage summary at the start, and every warning, on standard error
  (``pwfn.enable_logging()``; ``pwfn.enable_logging(logging.DEBUG)`` for more,
  ``pwfn.enable_logging(None)`` to stop). The ``pwfn`` command line uses it too. Its lines are
  written around the progress bars instead of through them.

Nothing here imports torch, and tqdm only once a bar is made, so commands that answer at once
(``pwfn --help``, ``pwfn report``) do not pay for it.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Optional, Union

#: the loggers pwfn's own messages go to
LOGGERS = ("pwfn", "bayes")
FORMAT = "%(levelname)s %(name)s: %(message)s"


def progress_bar(total: Optional[float] = None, desc: str = "", *, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar that shows only when ``enabled`` and standard error is a terminal, and is erased when
    closed. Further keyword arguments go to tqdm (``unit``, ``initial``, ...)."""
    from tqdm.auto import tqdm

    # disable=None: tqdm switches itself off when its output is not a terminal
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True,
                **kwargs)


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that writes each record around any progress bar on the screen (tqdm.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm_module = sys.modules.get("tqdm")
        if tqdm_module is None:  # no bar was ever made: nothing to write around
            super().emit(record)
            return
        try:
            tqdm_module.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:  # pragma: no cover - as logging.StreamHandler does
            raise
        except Exception:  # pragma: no cover
            self.handleError(record)


def _ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, ConsoleHandler)]


def enable_logging(level: Union[int, str, None] = logging.INFO, *, stream: Optional[IO[str]] = None,
                   ) -> Optional[logging.Handler]:
    """Show pwfn's log lines at ``level`` and above (default INFO: one line per round) on ``stream``
    (default: standard error); returns the handler. Calling it again replaces the earlier handler;
    ``None`` removes it and hands pwfn's messages back to your own logging set-up.

    While it is on, pwfn's records are not also passed to the root logger, so a root handler of
    yours does not print them twice.
    """
    handler: Optional[ConsoleHandler] = None
    if level is not None:
        handler = ConsoleHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in _ours(logger):
            logger.removeHandler(old)
        if handler is None:
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
        else:
            logger.setLevel(level)
            logger.addHandler(handler)
            logger.propagate = False
    return handler


__all__ = ["progress_bar", "enable_logging", "ConsoleHandler", "LOGGERS", "FORMAT"]
