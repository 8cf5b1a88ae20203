"""Colours and CSS of the Plan page: a light theme with Jefferson-blue accents."""

from __future__ import annotations

ACCENT = "#132456"  # Jefferson blue (dark)
ACCENT_LIGHT = "#56B4DA"
BACKGROUND = "#F7F9FC"
MUTED = "#6B7280"
BORDER = "#DDE3EC"

STATUS_COLOURS = {
    "pass": "#D7F0DC",
    "goal_missed": "#FCE7B6",
    "fail": "#F8D0CC",
    "not_evaluated": "#ECEFF3",
}
STATUS_TEXT = {"pass": "#1B5E20", "goal_missed": "#7A4F00", "fail": "#8E1B10", "not_evaluated": MUTED}
BETTER = "#D7F0DC"
WORSE = "#F8D0CC"

ROLE_COLOURS = {"target": "#B3261E", "oar": ACCENT, "rind": "#8A8F98", "other": "#8A8F98"}

RAW_CSS = f"""
:root {{
  --vmat-accent: {ACCENT};
  --vmat-accent-light: {ACCENT_LIGHT};
}}
.vmat-card {{
  background: white;
  border: 1px solid {BORDER};
  border-radius: 6px;
}}
"""

# Stylesheets applied to individual components (Panel renders them inside shadow roots).
BADGE_CSS = f"""
.badge {{ display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
          margin-left:6px; white-space:nowrap; }}
.badge-optimal {{ background:#D7F0DC; color:#1B5E20; }}
.badge-gap {{ background:#FCE7B6; color:#7A4F00; }}
.badge-ref {{ background:#E3F2FA; color:{ACCENT}; }}
/* A drawn "i" (the page font has no circled-i glyph): hover the badge for the reason. */
.info-dot {{ display:inline-block; width:13px; height:13px; line-height:13px; border-radius:50%;
             border:1px solid currentColor; font-size:10px; font-style:italic; text-align:center;
             margin-left:3px; font-family:Georgia, serif; }}
.badge-norm {{ background:#EDE7F6; color:#4527A0; }}
.badge-run {{ background:#E3F2FA; color:{ACCENT}; }}
.badge-fail {{ background:#F8D0CC; color:#8E1B10; }}
.badge-full {{ background:#DDEFE3; color:#14532D; border:1px solid #9CCFAE; }}
.badge-grid {{ background:#F1F3F6; color:#374151; border:1px solid #CBD2DC; }}
.muted {{ color:{MUTED}; }}
.err {{ color:#B3261E; font-size:12px; }}
.chip {{ display:inline-block; width:12px; height:12px; border-radius:3px; vertical-align:middle;
         border:1px solid rgba(0,0,0,.25); }}
.role {{ display:inline-block; font-size:10px; padding:0 5px; border-radius:8px; color:white;
         vertical-align:middle; text-transform:uppercase; letter-spacing:.03em; }}
.console {{ font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:11px;
            background:#0F172A; color:#E2E8F0; padding:6px 8px; border-radius:4px; white-space:pre;
            overflow:auto; }}
"""


def badge(text: str, kind: str) -> str:
    return f'<span class="badge badge-{kind}">{text}</span>'


def gap_badge(text: str) -> str:
    if not text:
        return ""
    kind = "optimal" if text == "optimal" else "ref" if text.startswith("reference") else "gap"
    return badge(text, kind)


def grid_badge(label: str, full_resolution: bool) -> str:
    """The dose grid a plan's numbers come from, so a full-resolution and an optimisation-grid evaluation are
    never read one for the other."""
    if not label:
        return ""
    return badge(label, "full" if full_resolution else "grid")
