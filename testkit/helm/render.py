"""Lints and renders a Helm chart with Helm's own Go SDK (helm-python-sdk), for tests and for
`cargo xtask generate` (deploy/ is rendered from the chart).

Usage: render.py CHART_DIR RELEASE NAMESPACE VALUES_JSON
Prints one JSON object: {"lint": {...}, "manifests": {template path: rendered text}}, where
the text of templates/NOTES.txt is the notes Helm prints after an install. Values that
values.schema.json refuses print {"values_error": message} and exit with status 3.
"""

import json
import sys

import helm_python
from helm_python.errors import HelmValuesError


def main() -> int:
    chart_dir, release, namespace, values = sys.argv[1:5]
    values = json.loads(values)
    chart = helm_python.Chart.load(chart_dir)
    try:
        try:
            chart.validate_schema(values)
            manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
        except HelmValuesError as e:
            json.dump({"values_error": str(e)}, sys.stdout)
            return 3
    finally:
        chart.close()
    lint = helm_python.lint(chart_dir, values, strict=False, namespace=namespace, quiet=True)
    json.dump({"lint": lint, "manifests": manifests}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
