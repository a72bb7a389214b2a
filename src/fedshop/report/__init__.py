"""Run folders: resolved config, data report, metrics.json, weights and an HTML report."""
