"""What the warm interpreter (orthodiff.warm) imports once, before it forks each run.

Lightning, at import, gives its loggers a console handler of their own and stops them
propagating when the root logger has no handler yet. A script imports Lightning after
Hydra has configured logging, so its messages reach the run's log file (train.log); a
placeholder handler on the root logger during these imports keeps that so here."""

import logging

_placeholder = logging.NullHandler()
logging.getLogger().addHandler(_placeholder)
import orthodiff.app.evaluate  # noqa: E402,F401
import orthodiff.app.train  # noqa: E402,F401

logging.getLogger().removeHandler(_placeholder)
