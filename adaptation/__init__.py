"""Jobs that adapt the served model's features from stored feedback (they need torch: run where training runs)."""
