#!/usr/bin/env bash
# k8s.sh: a real Kubernetes control plane on loopback, from registry
# packages, and the project's manifests applied to it (make test-k8s).
#
#   etcd                      Debian's etcd-server
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl
#                             built from the Go module proxy
#                             (deploy/k8s/cluster: k8s.io/kubernetes with a
#                             replace for each staging module), cached in
#                             .deps/k8s/bin
#   kwok                      sigs.k8s.io/kwok: fake nodes that run pods
#   the ServiceMonitor CRD    from the Go module
#                             github.com/prometheus-operator/prometheus-operator
#
# It applies both overlays with strict field validation (the namespace
# first), shows the API server refusing broken manifests, and checks the
# Deployment's rollout on kwok's node. The HPA chain (Prometheus,
# prometheus-adapter, scaling) is not part of it yet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=$root/.deps/k8s
bin=$dir/bin
KWOK_VERSION=v0.8.0
PROM_OPERATOR_VERSION=v0.85.0
etcd_port=23790 api_port=16443

tools() {
	mkdir -p "$bin"
	local sum
	sum=$(cat deploy/k8s/cluster/go.mod deploy/k8s/cluster/go.sum | sha256sum | cut -d' ' -f1)
	if [ "$(cat "$bin/.sum" 2>/dev/null)" != "$sum" ]; then
		echo "k8s: building kube-apiserver, kube-controller-manager, kube-scheduler and kubectl (minutes, once)" >&2
		(cd deploy/k8s/cluster && go build -o "$bin/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
			k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
		echo "$sum" > "$bin/.sum"
	fi
	if ! [ -x "$bin/kwok" ]; then
		echo "k8s: building kwok $KWOK_VERSION" >&2
		GOBIN=$bin GOFLAGS= go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
	fi
	if ! command -v etcd >/dev/null; then
		echo "k8s: installing etcd-server from apt" >&2
		local sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		$sudo apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
	fi
}

# certs writes a CA, the API server's serving cert, an admin client cert
# (system:masters), the service account key pair and a kubeconfig.
certs() {
	local d=$1
	(
		cd "$d"
		openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=visionserve-test-ca 2>/dev/null
		cat > san.cnf <<'EOF'
[req]
distinguished_name = dn
[dn]
[ext]
subjectAltName = IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
EOF
		openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
		openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 2 -extfile san.cnf -extensions ext 2>/dev/null
		openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/CN=admin/O=system:masters" 2>/dev/null
		openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 2 2>/dev/null
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
	)
	local kc=$d/kubeconfig
	"$bin/kubectl" --kubeconfig "$kc" config set-cluster test --server "https://127.0.0.1:$api_port" --certificate-authority "$d/ca.crt" --embed-certs >/dev/null
	"$bin/kubectl" --kubeconfig "$kc" config set-credentials admin --client-certificate "$d/admin.crt" --client-key "$d/admin.key" --embed-certs >/dev/null
	"$bin/kubectl" --kubeconfig "$kc" config set-context test --cluster test --user admin >/dev/null
	"$bin/kubectl" --kubeconfig "$kc" config use-context test >/dev/null
}

pids=()
stop() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}

start() {
	local d=$1
	etcd --data-dir "$d/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
		--listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
		--initial-cluster default=http://127.0.0.1:23800 > "$d/etcd.log" 2>&1 &
	pids+=($!)
	"$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
		--secure-port "$api_port" --tls-cert-file "$d/apiserver.crt" --tls-private-key-file "$d/apiserver.key" \
		--client-ca-file "$d/ca.crt" --service-account-key-file "$d/sa.pub" --service-account-signing-key-file "$d/sa.key" \
		--service-account-issuer https://kubernetes.default.svc --authorization-mode Node,RBAC \
		--service-cluster-ip-range 10.0.0.0/24 > "$d/apiserver.log" 2>&1 &
	pids+=($!)
	local k=("$bin/kubectl" --kubeconfig "$d/kubeconfig")
	for _ in $(seq 120); do
		"${k[@]}" get --raw /readyz >/dev/null 2>&1 && break
		sleep 1
	done
	"${k[@]}" get --raw /readyz >/dev/null || { tail -20 "$d/apiserver.log" >&2; return 1; }
	"$bin/kube-controller-manager" --kubeconfig "$d/kubeconfig" --authentication-kubeconfig "$d/kubeconfig" \
		--authorization-kubeconfig "$d/kubeconfig" --leader-elect=false --use-service-account-credentials \
		--service-account-private-key-file "$d/sa.key" --root-ca-file "$d/ca.crt" --bind-address 127.0.0.1 --secure-port 0 \
		--controllers '*,-nodeipam,-cloud-node-lifecycle' > "$d/controller-manager.log" 2>&1 &
	pids+=($!)
	"$bin/kube-scheduler" --kubeconfig "$d/kubeconfig" --authentication-kubeconfig "$d/kubeconfig" \
		--authorization-kubeconfig "$d/kubeconfig" --leader-elect=false --bind-address 127.0.0.1 --secure-port 0 > "$d/scheduler.log" 2>&1 &
	pids+=($!)
	# kwok's own "fast" stages, from its module: nodes turn Ready at
	# once, pods turn Running and Ready once scheduled.
	local stages=() kwok_dir
	kwok_dir=$(cd deploy/k8s/cluster && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
	for f in "$kwok_dir"/kustomize/stage/node/fast/node-*.yaml "$kwok_dir"/kustomize/stage/node/heartbeat/*.yaml "$kwok_dir"/kustomize/stage/pod/fast/pod-*.yaml; do
		[ -f "$f" ] && stages+=(--config "$f")
	done
	# Debian's etcd 3.4 lacks the progress notifications that kwok's
	# client-go uses for streaming lists by default: list and watch then.
	KUBE_FEATURE_WatchListClient=false "$bin/kwok" --kubeconfig "$d/kubeconfig" --manage-all-nodes=false "${stages[@]}" \
		--manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake --server-address 127.0.0.1:0 > "$d/kwok.log" 2>&1 &
	pids+=($!)
	"${k[@]}" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-0
spec: {}
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
EOF
}

test_manifests() {
	local d=$1 fail=0
	local k=("$bin/kubectl" --kubeconfig "$d/kubeconfig")
	check() { if "${@:2}" >>"$d/checks.log" 2>&1; then echo "k8s: ok: $1" >&2; else echo "k8s: FAILED: $1" >&2; fail=1; fi; }
	refused() { ! "$@"; }
	local crd
	crd=$(cd deploy/k8s/cluster && GOFLAGS= go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
	check "the ServiceMonitor CRD installs" "${k[@]}" apply --server-side -f "$crd/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
	"${k[@]}" wait --for condition=established --timeout 60s crd/servicemonitors.monitoring.coreos.com >/dev/null
	check "the namespace exists first" "${k[@]}" create namespace visionserve
	for o in cpu gpu; do
		check "overlay $o passes server-side dry run, strict fields" "${k[@]}" apply --dry-run=server --validate=strict -k "deploy/k8s/overlays/$o"
	done
	check "overlay cpu applies" "${k[@]}" apply --validate=strict -k deploy/k8s/overlays/cpu
	# Broken on purpose: the API server refuses each.
	local broken=$d/broken
	mkdir -p "$broken"
	"${k[@]}" kustomize deploy/k8s/overlays/cpu > "$broken/all.yaml"
	sed 's/name: grpc$/name: grpc-port-name-too-long/' "$broken/all.yaml" > "$broken/port.yaml"
	check "a port name over 15 characters is refused" refused "${k[@]}" apply --dry-run=server -f "$broken/port.yaml"
	sed -E 's/(minAvailable|maxUnavailable): .*/\1: 150%/' "$broken/all.yaml" > "$broken/pdb.yaml"
	check "a PodDisruptionBudget of 150% is refused" refused "${k[@]}" apply --dry-run=server -f "$broken/pdb.yaml"
	sed -E 's/averageValue: .*/averageValue: "-5"/' "$broken/all.yaml" > "$broken/hpa.yaml"
	check "a negative HPA averageValue is refused" refused "${k[@]}" apply --dry-run=server -f "$broken/hpa.yaml"
	# The Deployment rolls out on kwok's node (the HPA sets the replicas).
	check "the Deployment rolls out" "${k[@]}" -n visionserve rollout status deployment/visionserve --timeout 120s
	check "its pods run on the fake node" bash -c "'${k[0]}' --kubeconfig '$d/kubeconfig' -n visionserve get pods -o jsonpath='{.items[*].spec.nodeName}' | grep -q kwok-node-0"
	"${k[@]}" -n visionserve get deploy,rs,pods,hpa,pdb,svc >&2 || true
	if [ "$fail" != 0 ] && [ -n "${K8S_DEBUG:-}" ]; then
		"${k[@]}" get nodes -o wide >&2 || true
		"${k[@]}" -n visionserve describe pods >&2 || true
		tail -20 "$d/kwok.log" >&2
	fi
	return $fail
}

case "${1:-all}" in
tools) tools ;;
all)
	tools
	d=$(mktemp -d)
	trap 'stop; rm -rf "$d"' EXIT
	certs "$d"
	start "$d"
	if ! test_manifests "$d"; then
		tail -20 "$d/checks.log" >&2
		exit 1
	fi
	;;
*) echo "usage: $0 [tools|all]" >&2; exit 2 ;;
esac
