#!/usr/bin/env bash
# End-to-end proof that the node up.sh DIR started really runs dbshift: in a fresh namespace that
# enforces the `restricted` Pod Security Standard (on 1.23+; 1.20 ignores the label) it
#   1. runs kubectl (the cluster's, $KUBECTL) in a pod on the pod network
#      (KUBERNETES_SERVICE_HOST=$APISERVER_HOST, the bridge address the API server listens on) with
#      its mounted service-account token and ca.crt: a token-authenticated, CA-verified request to
#      the API server from inside a container, answered according to the account's RBAC;
#   2. runs `dbshift run` as a Job for one tenant (image from deploy/image/build.sh, migration from a
#      ConfigMap, URI from a Secret file, locked-down securityContext), checks the Job completes, the
#      pod's termination message is dbshift's JSON result, and the tenant database really changed;
#   3. runs the same Job against a tenant whose data makes the migration fail (duplicate e-mails
#      under a unique index), and checks the Job fails, and the pod status holds the container's
#      non-zero exit code and dbshift's `ok: false` result with the same code.
#
# Usage: smoke.sh DIR [--image IMAGE.tar] [--uri MONGODB_URI] [--keep]
#   --image  a dbshift image tarball (default: built by deploy/image/build.sh from
#            target/release/dbshift, which must exist: cargo build --release --locked)
#   --uri    a MongoDB server on the node's bridge address, which pods reach (default: a
#            SecantusDB started there by tests/support/secantus.sh for the duration of the test)
#   --keep   leave the namespace (and its pods) for inspection
# Prints one line per check on stdout (with timings); exits non-zero on the first failure, after
# printing the failing pod's description and logs to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
DIR=${1:?usage: smoke.sh DIR [--image IMAGE.tar] [--uri MONGODB_URI] [--keep]}
shift
IMAGE_TAR='' URI='' KEEP=0
while (( $# )); do
  case $1 in
    --image) IMAGE_TAR=${2:?}; shift 2 ;;
    --uri) URI=${2:?}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: smoke.sh DIR [--image IMAGE.tar] [--uri MONGODB_URI] [--keep]" >&2; exit 2 ;;
  esac
done
MIGRATION=$ROOT/migrations/20250101090000_customer_preferences.yaml
TIMEOUT=${SMOKE_TIMEOUT:-120}

log() { echo "[smoke] $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[[ -f $DIR/env ]] || die "no $DIR/env: start a cluster with up.sh $DIR"
# shellcheck disable=SC1091
source "$DIR/env"
[[ -n ${NODE_NAME:-} ]] || die "the cluster under $DIR has no node (started with --no-node?)"
KUBECTL=${KUBECTL:-$K8S_BIN/kubectl}
K=("$KUBECTL" --kubeconfig "$KUBECONFIG")
NS=dbshift-smoke-$(date +%s)-$$
work=$(mktemp -d)

cleanup() {
  local rc=$?
  if (( rc != 0 )); then
    log "namespace $NS:"
    "${K[@]}" -n "$NS" get jobs,pods -o wide >&2 2>/dev/null || true
    for p in $("${K[@]}" -n "$NS" get pods -o name 2>/dev/null); do
      "${K[@]}" -n "$NS" describe "$p" 2>/dev/null | sed -n '/^Events:/,$p' >&2 || true
      log "logs of $p:"; "${K[@]}" -n "$NS" logs "$p" >&2 2>/dev/null || true
    done
  fi
  if (( ! KEEP )); then "${K[@]}" delete namespace "$NS" --wait=false >/dev/null 2>&1 || true; fi
  [[ -f $work/mongo.pid ]] && kill "$(cat "$work/mongo.pid")" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# --- images ----------------------------------------------------------------------------------------
if [[ -z $IMAGE_TAR ]]; then
  bin=$ROOT/target/release/dbshift
  [[ -x $bin ]] || die "no $bin: cargo build --release --locked"
  version=$("$bin" --version | awk '{print $2}')
  IMAGE_TAR=$("$ROOT/deploy/image/build.sh" -b "$bin" -t "dbshift:$version" -o "$work/dbshift.tar")
fi
IMAGE=$("$HERE/load-image.sh" "$DIR" "$IMAGE_TAR" | head -n1)
# kubectl inside the image must be a static binary (the busybox image has no libc).
KUBECTL_REAL=$(readlink -f "$KUBECTL")
! ldd "$KUBECTL_REAL" >/dev/null 2>&1 || die "$KUBECTL_REAL is not statically linked: it cannot run in the busybox image"
KUBECTL_VERSION=$("$KUBECTL" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"].lstrip("v").split("-")[0])')
KUBECTL_TAR=$("$HERE/busybox-image.sh" -t "localhost/dbshift-test/kubectl:$KUBECTL_VERSION" "$KUBECTL_REAL=/usr/local/bin/kubectl")
KUBECTL_IMAGE=$("$HERE/load-image.sh" "$DIR" "$KUBECTL_TAR" | head -n1)
log "images: $IMAGE, $KUBECTL_IMAGE"

# --- MongoDB and tenant data -----------------------------------------------------------------------
"$ROOT/tests/support/secantus.sh" install >/dev/null
PY=$(dirname "$("$ROOT/tests/support/secantus.sh" bin)")/python   # its venv has pymongo
if [[ -z $URI ]]; then URI=$("$ROOT/tests/support/secantus.sh" start "$work/mongo.pid" "$NODE_IP"); fi
case $URI in "mongodb://$NODE_IP:"*) ;; *) die "the URI must point at the node's bridge address $NODE_IP (pods reach nothing else)" ;; esac
OK_DB=smoke_ok_$$ FAIL_DB=smoke_fail_$$
"$PY" - "$URI" "$OK_DB" "$FAIL_DB" <<'PY'
import sys
from pymongo import MongoClient
uri, ok_db, fail_db = sys.argv[1:]
c = MongoClient(uri)
c[ok_db].customers.insert_many([{"_id": i, "email": f"c{i}@example.com"} for i in range(50)])
# Two customers share an e-mail address: the migration's unique index cannot be built.
c[fail_db].customers.insert_many([{"_id": 1, "email": "same@example.com"}, {"_id": 2, "email": "same@example.com"}])
PY

"${K[@]}" create namespace "$NS" >/dev/null
"${K[@]}" label namespace "$NS" pod-security.kubernetes.io/enforce=restricted >/dev/null
"${K[@]}" -n "$NS" create configmap migrations --from-file="$MIGRATION" >/dev/null
"${K[@]}" -n "$NS" create secret generic mongodb --from-literal=uri="$URI" >/dev/null
until "${K[@]}" -n "$NS" get serviceaccount default >/dev/null 2>&1; do sleep 0.2; done

# wait_pod_done NAME: until the pod has terminated; prints its terminated state as JSON.
wait_terminated() { # selector-args...
  local deadline=$(( $(date +%s) + TIMEOUT )) state
  while :; do
    state=$("${K[@]}" -n "$NS" get pods "$@" -o 'jsonpath={.items[0].status.containerStatuses[0].state.terminated}' 2>/dev/null || true)
    [[ -n $state ]] && { echo "$state"; return 0; }
    (( $(date +%s) < deadline )) || die "no terminated container for pods $* after ${TIMEOUT}s"
    sleep 0.2
  done
}
json() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {'d': d}))" "$1" "$2"; }

# --- 1. the API server from inside a pod, with the service-account token -----------------------------
"${K[@]}" -n "$NS" create serviceaccount smoke >/dev/null
"${K[@]}" -n "$NS" create role pod-reader --verb=get,list --resource=pods >/dev/null
"${K[@]}" -n "$NS" create rolebinding smoke-pod-reader --role=pod-reader --serviceaccount="$NS:smoke" >/dev/null
# 1.20 mounts the account's token Secret (made by the controller-manager; wait for it); 1.24+
# mounts a projected token and makes no Secret.
if (( $(cut -d. -f2 <<<"${K8S_VERSION:-1.20.2}") < 24 )); then
  until [[ -n $("${K[@]}" -n "$NS" get serviceaccount smoke -o 'jsonpath={.secrets[0].name}' 2>/dev/null) ]]; do sleep 0.2; done
fi
t0=$(now)
"${K[@]}" -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: api-from-pod}
spec:
  serviceAccountName: smoke
  restartPolicy: Never
  securityContext: {seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: kubectl
    image: $KUBECTL_IMAGE
    imagePullPolicy: Never
    env:
    - {name: KUBERNETES_SERVICE_HOST, value: "$APISERVER_HOST"}
    - {name: KUBERNETES_SERVICE_PORT, value: "$APISERVER_PORT"}
    # In-cluster config: the mounted token and ca.crt (the server certificate is verified).
    command: [sh, -c, 'exec >/dev/termination-log 2>&1; kubectl get pods -o name; echo "create pods: \$(kubectl auth can-i create pods)"; kubectl get secrets; echo "done"']
    securityContext: {runAsUser: 65532, runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
YAML
state=$(wait_terminated --field-selector metadata.name=api-from-pod)
msg=$(json "$state" "d.get('message', '')")
grep -qx "pod/api-from-pod" <<<"$msg" || die "api-from-pod did not list itself: $msg"
grep -qx "create pods: no" <<<"$msg" || die "api-from-pod: RBAC not applied as expected: $msg"
grep -q "system:serviceaccount:$NS:smoke" <<<"$msg" || die "api-from-pod: not authenticated as the service account: $msg"
echo "api-from-pod ok in $(since "$t0") s: token-authenticated TLS request from a pod on the pod network to $APISERVER_HOST; RBAC of $NS:smoke applied"

# --- 2./3. dbshift run as a Job ---------------------------------------------------------------------
job() { # name tenant
  cat <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: $1}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      # fsGroup: the Secret file (mode 0440) is readable by group 65532.
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532,
                        seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: dbshift
        image: $IMAGE
        imagePullPolicy: Never
        args: [run]
        env:
        - {name: DBSHIFT_TENANT, value: "$2"}
        - {name: DBSHIFT_DIR, value: /migrations}
        - {name: DBSHIFT_RUN_ID, value: smoke}
        - {name: DBSHIFT_MONGODB_URI_FILE, value: /var/run/secrets/dbshift/mongodb/uri}
        securityContext:
          runAsNonRoot: true
          runAsUser: 65532
          readOnlyRootFilesystem: true
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
        resources:
          limits: {memory: 256Mi}
        volumeMounts:
        - {name: migrations, mountPath: /migrations, readOnly: true}
        - {name: mongodb, mountPath: /var/run/secrets/dbshift/mongodb, readOnly: true}
        - {name: tmp, mountPath: /tmp}
      volumes:
      - name: migrations
        configMap: {name: migrations}
      - name: mongodb
        secret: {secretName: mongodb, defaultMode: 0440}
      - name: tmp
        emptyDir: {}
YAML
}
# run_job NAME TENANT: prints "<condition> <seconds>" once the Job is Complete or Failed.
run_job() {
  local t0 deadline s
  t0=$(now); deadline=$(( $(date +%s) + TIMEOUT ))
  job "$1" "$2" | "${K[@]}" -n "$NS" create -f - >/dev/null
  while :; do
    # 1.31+ first sets SuccessCriteriaMet / FailureTarget, then Complete / Failed.
    s=$("${K[@]}" -n "$NS" get job "$1" -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}' 2>/dev/null || true)
    for c in Complete Failed; do
      if grep -qw "$c" <<<"$s"; then echo "$c $(since "$t0")"; return 0; fi
    done
    (( $(date +%s) < deadline )) || die "job $1 neither Complete nor Failed after ${TIMEOUT}s"
    sleep 0.2
  done
}
migration_id=$(basename "$MIGRATION" .yaml); migration_id=${migration_id%%_*}

read -r cond secs < <(run_job migrate-ok "$OK_DB")
state=$(wait_terminated -l job-name=migrate-ok)
[[ $cond == Complete ]] || die "job migrate-ok: $cond, container state $state"
msg=$(json "$state" "d.get('message', '')")
[[ $(json "$state" "d['exitCode']") == 0 ]] || die "migrate-ok exit code: $state"
[[ $(json "$msg" "d['ok'] and d['tenant']") == "$OK_DB" ]] || die "migrate-ok termination message: $msg"
json "$msg" "[x[0] for x in d['done']]" | grep -q "$migration_id" || die "migrate-ok did not apply $migration_id: $msg"
"$PY" - "$URI" "$OK_DB" <<'PY' || die "tenant $OK_DB not migrated"
import sys
from pymongo import MongoClient
db = MongoClient(sys.argv[1])[sys.argv[2]]
missing = db.customers.count_documents({"preferences": {"$exists": False}})
names = [i["name"] for i in db.customers.list_indexes()]
assert db.customers.count_documents({}) == 50 and missing == 0, f"{missing} customers without preferences"
assert "email_unique" in names, f"indexes: {names}"
PY
# The tracking collection, through the CLI on the host (when the release binary is there).
if [[ -x $ROOT/target/release/dbshift ]]; then
  mkdir -p "$work/migrations" && cp "$MIGRATION" "$work/migrations/"
  status=$(DBSHIFT_MONGODB_URI=$URI "$ROOT/target/release/dbshift" status --tenant "$OK_DB" --dir "$work/migrations" --output json) \
    || die "dbshift status --tenant $OK_DB failed: $status"
  [[ $(json "$status" "d['tenants'][0]['result'][0]['standing']") == applied ]] || die "dbshift status: $status"
fi
echo "job migrate-ok Complete in $secs s (create -> Complete); tenant $OK_DB migrated (customers, index, dbshift status); termination message: $msg"

read -r cond secs < <(run_job migrate-fail "$FAIL_DB")
state=$(wait_terminated -l job-name=migrate-fail)
[[ $cond == Failed ]] || die "job migrate-fail: $cond (expected Failed), container state $state"
msg=$(json "$state" "d.get('message', '')")
code=$(json "$state" "d['exitCode']")
# The exit code is dbshift's (see `dbshift --help`): 1 when a migration failed and was undone.
[[ $code != 0 && $(json "$msg" "d['code']") == "$code" && $(json "$msg" "d['ok']") == False ]] \
  || die "migrate-fail: exit code $code, termination message: $msg"
echo "job migrate-fail Failed in $secs s with exit code $code; termination message: $(cut -c1-300 <<<"$msg")..."
