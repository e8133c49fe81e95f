"""Runtime for learned diffusion samplers: every sampler is a solver table run by one executor.

    from samplers import SolverTable, sample, make_noise, baselines, schedules, denoisers
"""

from . import baselines, denoisers, schedules
from .table import FORMAT_VERSION, SolverTable, TableError, TableRun, make_noise, sample
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "SolverTable",
    "TableError",
    "TableRun",
    "baselines",
    "denoisers",
    "make_noise",
    "sample",
    "schedules",
    "__version__",
]
