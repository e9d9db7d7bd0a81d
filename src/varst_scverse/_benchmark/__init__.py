"""Private pieces of ``varst benchmark``: data and splits, methods, ablations, speed, report writers."""
