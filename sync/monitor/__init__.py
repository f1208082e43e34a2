"""What the daemon tells the outside world: its heartbeat row in the state DB, Prometheus
metrics, health checks and a read-only status page, served on ``[daemon] http``."""

from sync.monitor.heartbeat import Heartbeat
from sync.monitor.metrics import Metrics
from sync.monitor.server import MonitorServer, Readiness

__all__ = ["Heartbeat", "Metrics", "MonitorServer", "Readiness"]
