"""Training: the one loop (loop.py) and the tasks it drives (image flows, distillation and reflow)."""
