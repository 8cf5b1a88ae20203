"""VMAT Planner core: cases, objectives, runner, solvers, evaluation, run store and jobs (no UI imports)."""

__version__ = "1.0.0"
