"""VMAT Planner core: cases, objectives, runner, solvers, evaluation, run store and jobs (no UI imports)."""

__version__ = "0.1.0"
