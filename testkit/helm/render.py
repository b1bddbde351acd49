"""Lints and renders a Helm chart with Helm's own Go SDK (helm-python-sdk), for tests.

Usage: render.py CHART_DIR RELEASE NAMESPACE VALUES_JSON
Prints one JSON object: {"lint": {...}, "manifests": {template path: rendered YAML}}.
"""

import json
import sys

import helm_python


def main() -> int:
    chart_dir, release, namespace, values = sys.argv[1:5]
    values = json.loads(values)
    lint = helm_python.lint(chart_dir, values, strict=False, namespace=namespace, quiet=True)
    chart = helm_python.Chart.load(chart_dir)
    try:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    finally:
        chart.close()
    json.dump({"lint": lint, "manifests": manifests}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
