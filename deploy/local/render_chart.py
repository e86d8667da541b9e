"""Render charts/dbshift offline (helm-python-sdk) and print the manifests, a Namespace first,
in Helm's install order, ready for `kubectl apply --server-side -f -`.

    python deploy/local/render_chart.py [--label KEY=VALUE]... [--kube-version V] RELEASE NAMESPACE [VALUES_JSON]

--label puts a label on the Namespace, e.g. pod-security.kubernetes.io/enforce=restricted (the
controller with the chart's defaults meets the `restricted` Pod Security Standard).
--kube-version renders for that server, as `helm install` would (e.g. 1.20.2: the CRD without
its CEL rules, which servers before 1.25 refuse).
Used by deploy/local/demo.sh and tests/run.sh (there is no helm binary on these machines; the
chart is the same one `helm install` would use).
"""

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "manifests"))
import render  # noqa: E402  (deploy/manifests/render.py: the one renderer)


def main() -> None:
    args = sys.argv[1:]
    labels = {}
    kube_version = None
    while args and args[0] in ("--label", "--kube-version"):
        if len(args) < 2:
            sys.exit(__doc__)
        if args[0] == "--kube-version":
            kube_version = "v" + args[1].lstrip("v")
        elif "=" not in args[1]:
            sys.exit(__doc__)
        else:
            key, value = args[1].split("=", 1)
            labels[key] = value
        args = args[2:]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    release, namespace = args[0], args[1]
    values = json.loads(args[2]) if len(args) == 3 else None
    docs = render.documents(render.render_chart(values, name=release, namespace=namespace,
                                                kube_version=kube_version))
    meta = {"name": namespace}
    if labels:
        meta["labels"] = labels
    ns = yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}, sort_keys=False).rstrip()
    print("---\n" + "\n---\n".join([ns] + [text for _, text, _ in docs]))


if __name__ == "__main__":
    main()
