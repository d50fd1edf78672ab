#!/bin/sh
# The deployment's credentials, made here and never committed. Run once per cluster:
#
#   sh deploy/k8s/make-secrets.sh | kubectl create -f -
#
# It prints (stdout) two Secrets for the `sessionpool` namespace, and the admin key (stderr,
# shown only this once: keep it):
#   sessionpool-secrets    REDIS_PASSWORD: Redis and Sentinel's password (random, 256 bits),
#                          read by the Redis pods, the routers and the workers
#   sessionpool-api-keys   api-keys.yaml: the routers' api_keys_file (mounted at /credentials),
#                          one `admin` key (admin + executor, every pool) stored as SHA-256
# `kubectl create` refuses to overwrite existing Secrets, so running it twice changes nothing.
# More keys: `sessionpool new-key NAME --role executor --pool P --file api-keys.yaml`, then
# replace the Secret's file; the routers re-read it when the kubelet updates the mount.
set -eu
exec python3 - "$@" <<'PY'
import base64, hashlib, json, secrets, sys

def secret(name, data):
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "sessionpool",
            "labels": {"app.kubernetes.io/part-of": "sessionpool"},
        },
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }

key = "sp_" + secrets.token_urlsafe(32)
entry = (
    "- name: admin\n"
    f"  key_sha256: {hashlib.sha256(key.encode()).hexdigest()}\n"
    "  roles: [admin, executor]\n"
    "  pools: ['*']\n"
)
docs = [
    secret("sessionpool-secrets", {"REDIS_PASSWORD": secrets.token_urlsafe(32)}),
    secret("sessionpool-api-keys", {"api-keys.yaml": entry}),
]
print("\n---\n".join(json.dumps(d, indent=2) for d in docs))
print(f"# the admin key (shown once, keep it): {key}", file=sys.stderr)
PY
