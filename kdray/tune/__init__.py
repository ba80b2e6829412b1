"""Ray Tune sweeps over a config's `tune.search_space`, sharing one teacher pass across trials.

`run_sweep(cfg)` is what `kdray sweep` and `workflows/sweep.py` call; see `runner.py`. Importing this
package imports Ray Tune lazily, so the CLI stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SweepResult", "run_sweep", "sweep_dir"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdray.tune import runner

        return getattr(runner, name)
    raise AttributeError(name)
