"""VMAT Planner web app (Panel)."""
