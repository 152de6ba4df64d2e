"""Tools for finished runs: evaluate, calibration, report, predict, export. Never imports training."""
