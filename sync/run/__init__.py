"""One run's steps before delivery: compute the snapshot from the source, check config drift,
plan the membership changes, and report."""
