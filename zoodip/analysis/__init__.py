"""Turning runs into findings: sweep reports and heatmaps (zoodip-report), equal-budget comparisons
(zoodip-compare), pictures, the dashboard, and studies that outlive machines (zoodip-study)."""
