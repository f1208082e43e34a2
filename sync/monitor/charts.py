"""Small inline SVG charts for the status page: no JavaScript, no external files."""

from __future__ import annotations

from html import escape

from sync.state.monitoring import RunPoint

WIDTH = 240
HEIGHT = 64
PAD = 4


def runs_chart(points: list[RunPoint]) -> str:
    """Members (a line with a dot per run that computed the audience) and messages sent (a bar
    per run) over ``points``, each scaled to its own maximum; every mark has a tooltip."""
    if not points:
        return '<span class="no-chart">no runs yet</span>'
    step = (WIDTH - 2 * PAD) / len(points)
    max_members = max((p.members or 0 for p in points), default=0) or 1
    max_sent = max(p.sent for p in points) or 1
    inner = HEIGHT - 2 * PAD
    bars, dots, line = [], [], []
    for i, point in enumerate(points):
        x = PAD + i * step
        height = inner * point.sent / max_sent
        when = point.started_at.strftime("%Y-%m-%d %H:%M:%S")
        bars.append(
            f'<rect class="sent" x="{x + step * 0.15:.1f}" y="{HEIGHT - PAD - height:.1f}" '
            f'width="{step * 0.7:.1f}" height="{height:.1f}">'
            f"<title>run {point.run_id} ({escape(point.status)}, {when}): "
            f"{point.sent} sent</title></rect>"
        )
        if point.members is not None:
            cx = x + step / 2
            cy = HEIGHT - PAD - inner * point.members / max_members
            line.append(f"{cx:.1f},{cy:.1f}")
            dots.append(
                f'<circle class="members" cx="{cx:.1f}" cy="{cy:.1f}" r="2">'
                f"<title>run {point.run_id} ({when}): {point.members} members</title></circle>"
            )
    polyline = f'<polyline class="members" points="{" ".join(line)}"/>' if line else ""
    label = (
        f"members (line, up to {max_members if any(p.members for p in points) else 0}) and "
        f"messages sent (bars, up to {max(p.sent for p in points)}) over the last "
        f"{len(points)} run(s)"
    )
    base = HEIGHT - PAD
    return (
        f'<svg class="chart" role="img" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>"
        f'<line class="axis" x1="{PAD}" y1="{base}" x2="{WIDTH - PAD}" y2="{base}"/>'
        f"{''.join(bars)}{polyline}{''.join(dots)}</svg>"
    )
