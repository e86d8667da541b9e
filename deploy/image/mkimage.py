#!/usr/bin/env python3
"""Write a one-layer container image as a docker-archive tarball (the `docker save` format) from a
directory, with no container engine. `docker load`, `podman load`, `ctr images import`,
`kind load image-archive` and `k3s ctr images import` all read it.

    mkimage.py --tag NAME:TAG --out IMAGE.tar [--entrypoint JSON] [--cmd JSON] [--user USER]
               [--workdir DIR] [--env K=V]... [--label K=V]... [--chown PATH=UID:GID]... ROOTFS

The layer is reproducible: entries sorted, owned by 0:0 unless --chown says otherwise (PATH is
relative to ROOTFS; it applies to that entry only), modification times set to SOURCE_DATE_EPOCH
(default 0), no user or group names. Standard library only.
"""
import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import stat
import sys
import tarfile
import tempfile

ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def parse_kv(items, what):
    out = {}
    for item in items:
        if "=" not in item:
            sys.exit(f"mkimage: {what} must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def write_layer(rootfs, out, owners, mtime):
    """Writes the layer tar of ROOTFS to the file object OUT."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, rootfs)
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                info = tar.gettarinfo(path, arcname=rel)
                info.uid, info.gid = owners.get(rel, (0, 0))
                info.uname = info.gname = ""
                info.mtime = mtime
                info.pax_headers = {}
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                elif info.isdir() or info.issym():
                    tar.addfile(info)
                else:
                    sys.exit(f"mkimage: unsupported file type: {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, help="image reference, e.g. dbshift:0.1.0 (never :latest)")
    p.add_argument("--out", required=True)
    p.add_argument("--entrypoint", help="JSON list")
    p.add_argument("--cmd", help="JSON list")
    p.add_argument("--user")
    p.add_argument("--workdir")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--chown", action="append", default=[], help="PATH=UID:GID (PATH relative to ROOTFS)")
    p.add_argument("--arch", default=ARCH.get(platform.machine(), platform.machine()))
    p.add_argument("rootfs")
    a = p.parse_args()

    if ":" not in a.tag.rsplit("/", 1)[-1] or a.tag.endswith(":latest"):
        sys.exit(f"mkimage: --tag needs an explicit tag other than latest, got {a.tag!r}")
    if not os.path.isdir(a.rootfs):
        sys.exit(f"mkimage: {a.rootfs} is not a directory")
    owners = {}
    for path, ids in parse_kv(a.chown, "--chown").items():
        uid, _, gid = ids.partition(":")
        owners[os.path.normpath(path.lstrip("/"))] = (int(uid), int(gid or uid))
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))

    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir) as layer:
        write_layer(a.rootfs, layer, owners, mtime)
        layer.seek(0)
        h = hashlib.sha256()
        for chunk in iter(lambda: layer.read(1 << 20), b""):
            h.update(chunk)
        diff_id = h.hexdigest()
        size = layer.tell()

        cfg = {}
        if a.entrypoint:
            cfg["Entrypoint"] = json.loads(a.entrypoint)
        if a.cmd:
            cfg["Cmd"] = json.loads(a.cmd)
        if a.user:
            cfg["User"] = a.user
        if a.workdir:
            cfg["WorkingDir"] = a.workdir
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        env.update(parse_kv(a.env, "--env"))
        cfg["Env"] = [f"{k}={v}" for k, v in env.items()]
        if a.label:
            cfg["Labels"] = parse_kv(a.label, "--label")
        created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = {
            "architecture": a.arch,
            "os": "linux",
            "created": created,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": created, "created_by": "deploy/image/mkimage.py"}],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_id = hashlib.sha256(config_bytes).hexdigest()
        manifest = [{"Config": f"{config_id}.json", "RepoTags": [a.tag], "Layers": [f"{diff_id}/layer.tar"]}]
        manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()

        tmp_out = a.out + ".tmp"
        with tarfile.open(tmp_out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            def add_bytes(name, data):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))
            d = tarfile.TarInfo(diff_id)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(d)
            layer.seek(0)
            info = tarfile.TarInfo(f"{diff_id}/layer.tar")
            info.size, info.mtime, info.mode = size, mtime, 0o644
            tar.addfile(info, layer)
            add_bytes(f"{config_id}.json", config_bytes)
            add_bytes("manifest.json", manifest_bytes)
        os.replace(tmp_out, a.out)
    print(f"{a.tag} sha256:{config_id} ({size // 1024} KiB layer) -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
