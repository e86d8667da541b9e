"""Render charts/dbshift offline (helm-python-sdk) and print the manifests, a Namespace first,
in Helm's install order, ready for `kubectl apply --server-side -f -`.

    python deploy/local/render_chart.py RELEASE NAMESPACE [VALUES_JSON]

Used by deploy/local/demo.sh and tests/run.sh (there is no helm binary on these machines; the
chart is the same one `helm install` would use).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "manifests"))
import render  # noqa: E402  (deploy/manifests/render.py: the one renderer)


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    release, namespace = sys.argv[1], sys.argv[2]
    values = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    docs = render.documents(render.render_chart(values, name=release, namespace=namespace))
    ns = f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}"
    print("---\n" + "\n---\n".join([ns] + [text for _, text, _ in docs]))


if __name__ == "__main__":
    main()
