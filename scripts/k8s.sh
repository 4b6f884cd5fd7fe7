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
#   Prometheus                Debian's prometheus
#   prometheus-adapter        built from the Go module proxy (deploy/k8s/adapter)
#
# It applies both overlays with strict field validation (the namespace
# first; the gpu overlay's pods must stay Pending on a node without GPUs,
# then the cpu overlay replaces it), shows the API server refusing broken
# manifests, and checks the Deployment's rollout on kwok's node. Then the
# HPA chain (hpa_chain below): real infer-server processes stand in for
# the kwok pods, Prometheus scrapes them with the pods' names as labels,
# prometheus-adapter serves the project's rule through the custom metrics
# API, load on the servers raises visionserve_inflight_requests and the
# HPA scales the Deployment up and back down. The replica history goes to
# $K8S_HISTORY (default .deps/k8s/hpa-history.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=$root/.deps/k8s
bin=$dir/bin
KWOK_VERSION=v0.8.0
PROM_OPERATOR_VERSION=v0.85.0
etcd_port=23790 api_port=16443 prom_port=19090 adapter_port=16444

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
	sum=$(cat deploy/k8s/adapter/go.mod deploy/k8s/adapter/go.sum | sha256sum | cut -d' ' -f1)
	if [ "$(cat "$bin/.adapter-sum" 2>/dev/null)" != "$sum" ]; then
		echo "k8s: building prometheus-adapter (minutes, once)" >&2
		(cd deploy/k8s/adapter && GOFLAGS= go build -o "$bin/adapter" sigs.k8s.io/prometheus-adapter/cmd/adapter)
		echo "$sum" > "$bin/.adapter-sum"
	fi
	local missing=()
	command -v etcd >/dev/null || missing+=(etcd-server)
	command -v prometheus >/dev/null || missing+=(prometheus)
	if [ ${#missing[@]} -gt 0 ]; then
		echo "k8s: installing ${missing[*]} from apt" >&2
		local sudo=""
		[ "$(id -u)" -eq 0 ] || sudo=sudo
		$sudo apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
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
		# The aggregation layer: a front-proxy CA whose client the API
		# server proxies as, and the adapter's serving cert for the name
		# the API server verifies (SERVICE.NAMESPACE.svc).
		openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days 2 -subj /CN=visionserve-test-front-proxy-ca 2>/dev/null
		openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr -subj /CN=front-proxy-client 2>/dev/null
		openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key -CAcreateserial -out front-proxy-client.crt -days 2 2>/dev/null
		printf '[req]\ndistinguished_name = dn\n[dn]\n[ext]\nsubjectAltName = DNS:prometheus-adapter.monitoring.svc,DNS:localhost,IP:127.0.0.1\n' > adapter-san.cnf
		openssl req -newkey rsa:2048 -nodes -keyout adapter.key -out adapter.csr -subj /CN=prometheus-adapter 2>/dev/null
		openssl x509 -req -in adapter.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out adapter.crt -days 2 -extfile adapter-san.cnf -extensions ext 2>/dev/null
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
		--service-cluster-ip-range 10.0.0.0/24 \
		--requestheader-client-ca-file "$d/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
		--requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
		--requestheader-extra-headers-prefix X-Remote-Extra- \
		--proxy-client-cert-file "$d/front-proxy-client.crt" --proxy-client-key-file "$d/front-proxy-client.key" > "$d/apiserver.log" 2>&1 &
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
		--controllers '*,-nodeipam,-cloud-node-lifecycle' --horizontal-pod-autoscaler-sync-period 5s > "$d/controller-manager.log" 2>&1 &
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
	# The gpu overlay applied first: on a node without nvidia.com/gpu its
	# pods must wait, unscheduled, rather than run without a GPU. The cpu
	# overlay then replaces it (same objects).
	check "overlay gpu applies" "${k[@]}" apply --validate=strict -k deploy/k8s/overlays/gpu
	check "the gpu overlay's pods stay Pending on a node without GPUs" bash -c "for _ in \$(seq 60); do
		'${k[0]}' --kubeconfig '$d/kubeconfig' -n visionserve get pods -o jsonpath='{.items[*].status.conditions[?(@.type==\"PodScheduled\")].message}' | grep -q 'Insufficient nvidia.com/gpu' && exit 0
		sleep 1; done; exit 1"
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

# pod_runner: a real infer-server for each running kwok pod of the
# Deployment, on loopback ports of its own, announced to Prometheus (a
# file_sd target labelled with the pod's namespace, name, container and
# node) and to load_driver (its gRPC address) once /readyz answers. A pod
# that is deleted gets its server stopped with SIGTERM, as the kubelet does.
pod_runner() {
	local d=$1 i=0 pod phase gone
	declare -A srv=() http=() grpc=()
	trap 'kill "${srv[@]}" 2>/dev/null; wait; exit 0' TERM
	while :; do
		local running=""
		while read -r pod phase gone; do
			[ "$phase" = Running ] && [ -z "$gone" ] && running+="$pod "
		done < <("$bin/kubectl" --kubeconfig "$d/kubeconfig" -n visionserve get pods -l app.kubernetes.io/name=visionserve \
			-o jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp}{"\n"}{end}' 2>/dev/null)
		for pod in $running; do
			if [ -z "${srv[$pod]:-}" ]; then
				grpc[$pod]=127.0.0.1:$((21000 + i)) http[$pod]=127.0.0.1:$((22000 + i))
				bin/infer-server --model-repo "$d/repo" --backend ort-cpu --grpc-addr "${grpc[$pod]}" --http-addr "${http[$pod]}" \
					--rest-addr 127.0.0.1:$((23000 + i)) --grace-period 5s > "$d/server-$pod.log" 2>&1 &
				srv[$pod]=$!
				i=$((i + 1))
			elif [ ! -f "$d/grpc/$pod" ] && curl -sf "http://${http[$pod]}/readyz" >/dev/null; then
				printf '[{"targets": ["%s"], "labels": {"namespace": "visionserve", "pod": "%s", "container": "server", "node": "kwok-node-0"}}]\n' \
					"${http[$pod]}" "$pod" > "$d/targets/.$pod" && mv "$d/targets/.$pod" "$d/targets/$pod.json"
				echo "${grpc[$pod]}" > "$d/grpc/$pod"
			fi
		done
		for pod in "${!srv[@]}"; do
			case " $running" in *" $pod "*) continue ;; esac
			rm -f "$d/targets/$pod.json" "$d/grpc/$pod"
			kill "${srv[$pod]}" 2>/dev/null || true
			unset "srv[$pod]"
		done
		sleep 1
	done
}

# load_driver: a fixed total concurrency (the number in $d/load) spread
# evenly over the servers that are ready, as a Service would spread it;
# closed-loop infer-client load processes, restarted when either changes.
load_driver() {
	local d=$1 photo=$2 have="" c addrs n a
	local clients=()
	trap 'kill "${clients[@]}" 2>/dev/null; wait; exit 0' TERM
	while :; do
		c=$(cat "$d/load" 2>/dev/null || echo 0)
		addrs=$(cat "$d"/grpc/* 2>/dev/null | sort | tr '\n' ' ')
		if [ "$c $addrs" != "$have" ]; then
			[ ${#clients[@]} -gt 0 ] && kill "${clients[@]}" 2>/dev/null
			clients=()
			n=$(wc -w <<<"$addrs")
			if [ "$c" -gt 0 ] && [ "$n" -gt 0 ]; then
				for a in $addrs; do
					bin/infer-client load --addr "$a" --model mobilenetv3_large --batch 1 --concurrency $(((c + n - 1) / n)) \
						--duration 30m "$photo" >> "$d/load.log" 2>&1 &
					clients+=($!)
				done
			fi
			have="$c $addrs"
		fi
		sleep 1
	done
}

# hpa_chain: Prometheus, prometheus-adapter with the project's rule, the
# custom metrics API, and the HPA scaling the Deployment on the servers'
# own visionserve_inflight_requests.
hpa_chain() {
	local d=$1 fail=0
	local k=("$bin/kubectl" --kubeconfig "$d/kubeconfig")
	check() { if "${@:2}" >>"$d/checks.log" 2>&1; then echo "k8s: ok: $1" >&2; else echo "k8s: FAILED: $1" >&2; fail=1; fi; }
	mkdir -p "$d/targets" "$d/grpc" "$d/repo/mobilenetv3_large"
	local m=models/mobilenetv3_large
	[ -x bin/infer-server ] && [ -x bin/infer-client ] && [ -f "$m/model.onnx" ] ||
		{ echo "k8s: the HPA test needs bin/infer-server, bin/infer-client and $m/model.onnx (make build models)" >&2; return 1; }
	cp "$m/model.onnx" "$m/labels.txt" "$d/repo/mobilenetv3_large/"
	# Self-tuning measures for seconds on each start; not what this tests.
	sed 's/auto_tune: true/auto_tune: false/' "$m/config.yaml" > "$d/repo/mobilenetv3_large/config.yaml"
	local photo
	photo=$(scripts/testimage.sh dog "$d")

	cat > "$d/prometheus.yml" <<YAML
global: {scrape_interval: 2s, evaluation_interval: 2s}
scrape_configs:
  - job_name: visionserve
    file_sd_configs:
      - files: ['$d/targets/*.json']
        refresh_interval: 2s
YAML
	prometheus --config.file "$d/prometheus.yml" --storage.tsdb.path "$d/prometheus" \
		--web.listen-address "127.0.0.1:$prom_port" > "$d/prometheus.log" 2>&1 &
	pids+=($!)
	# The project's rules as shipped, and, for this test only, resource
	# rules: kwok's pods have no kubelet, so no metrics-server can report
	# their CPU, which the HPA's second metric needs; the adapter serves
	# metrics.k8s.io from the servers' own process metrics instead.
	{
		cat deploy/k8s/prometheus-adapter/rules.yaml
		cat <<'YAML'
resourceRules:
  cpu:
    containerQuery: sum(rate(process_cpu_seconds_total{<<.LabelMatchers>>}[20s])) by (<<.GroupBy>>)
    nodeQuery: sum(rate(process_cpu_seconds_total{<<.LabelMatchers>>}[20s])) by (<<.GroupBy>>)
    resources: &labels
      overrides: {namespace: {resource: namespace}, pod: {resource: pod}, node: {resource: node}}
    containerLabel: container
  memory:
    containerQuery: sum(process_resident_memory_bytes{<<.LabelMatchers>>}) by (<<.GroupBy>>)
    nodeQuery: sum(process_resident_memory_bytes{<<.LabelMatchers>>}) by (<<.GroupBy>>)
    resources: *labels
    containerLabel: container
  window: 20s
YAML
	} > "$d/adapter.yaml"
	"$bin/adapter" --config "$d/adapter.yaml" --prometheus-url "http://127.0.0.1:$prom_port/" --metrics-relist-interval 5s \
		--secure-port "$adapter_port" --bind-address 127.0.0.1 --tls-cert-file "$d/adapter.crt" --tls-private-key-file "$d/adapter.key" \
		--lister-kubeconfig "$d/kubeconfig" --authentication-kubeconfig "$d/kubeconfig" --authorization-kubeconfig "$d/kubeconfig" \
		> "$d/adapter.log" 2>&1 &
	pids+=($!)
	# The API server reaches the adapter through an ExternalName Service
	# (loopback Endpoints are refused by validation), with an APIService
	# for each GROUP/VERSION:PRIORITY the adapter serves.
	local ca
	ca=$(base64 -w0 "$d/ca.crt")
	"${k[@]}" apply -f - >>"$d/checks.log" 2>&1 <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Service
metadata: {name: prometheus-adapter, namespace: monitoring}
spec: {type: ExternalName, externalName: localhost}
$(for gv in custom.metrics.k8s.io/v1beta2:200 custom.metrics.k8s.io/v1beta1:100 metrics.k8s.io/v1beta1:100; do
	g=${gv%/*} v=${gv#*/}
	printf -- '---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {name: %s.%s}\nspec:\n  group: %s\n  version: %s\n  groupPriorityMinimum: 100\n  versionPriority: %s\n  caBundle: %s\n  service: {namespace: monitoring, name: prometheus-adapter, port: %s}\n' \
		"${v%:*}" "$g" "$g" "${v%:*}" "${v#*:}" "$ca" "$adapter_port"
done)
YAML
	check "the custom and resource metrics APIs are available through the aggregator" \
		"${k[@]}" wait --for condition=Available --timeout 120s apiservice/v1beta2.custom.metrics.k8s.io apiservice/v1beta1.metrics.k8s.io
	[ "$fail" = 0 ] || return 1

	pod_runner "$d" &
	pids+=($!)
	load_driver "$d" "$photo" &
	pids+=($!)
	# The test's patch: the shipped HPA's windows and periods shortened
	# (the same targets, bounds and step sizes), so that a run takes
	# minutes. The controller manager evaluates every 5 s (--horizontal-
	# pod-autoscaler-sync-period above) instead of 15.
	"${k[@]}" -n visionserve patch hpa visionserve --type merge -p '{"spec": {"behavior": {
		"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 15}, {"type": "Percent", "value": 100, "periodSeconds": 15}]},
		"scaleDown": {"stabilizationWindowSeconds": 15, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 10}]}}}}' >>"$d/checks.log" 2>&1

	local history=${K8S_HISTORY:-$dir/hpa-history.md} t0=$SECONDS
	printf '| t (s) | load (concurrent requests) | visionserve_inflight_requests, per-pod average | CPU (%% of request) | desired | replicas |\n|---|---|---|---|---|---|\n' > "$history"
	record() { # one row of the history; sets des and cur, the HPA's desired and current replicas
		local row
		row=$("${k[@]}" -n visionserve get hpa visionserve -o jsonpath='{.status.currentMetrics[?(@.type=="Pods")].pods.current.averageValue}|{.status.currentMetrics[?(@.type=="Resource")].resource.current.averageUtilization}|{.status.desiredReplicas}|{.status.currentReplicas}' 2>/dev/null) || return 0
		IFS='|' read -r _ _ des cur <<<"$row"
		des=${des:-0} cur=${cur:-0}
		# Quantities such as 57500m are written as 57.5.
		printf '| %d | %s | %s |\n' $((SECONDS - t0)) "$(cat "$d/load" 2>/dev/null || echo 0)" \
			"$(awk -F'|' '{ if ($1 ~ /m$/) $1 = substr($1, 1, length($1) - 1) / 1000; print $1 " | " $2 " | " $3 " | " $4 }' <<<"$row")" >> "$history"
	}
	# until WHAT TIMEOUT CONDITION: records every 5 s until the condition holds.
	until_hpa() {
		local what=$1 timeout=$2 cond=$3 end=$((SECONDS + $2)) cur=0 des=0 ready=0
		while [ $SECONDS -lt $end ]; do
			record
			ready=$(ls "$d/grpc" | wc -l)
			if (eval "$cond"); then
				echo "k8s: ok: $what ($((SECONDS - t0)) s: $cur replicas, $ready servers ready)" >&2
				return 0
			fi
			sleep 5
		done
		echo "k8s: FAILED: $what within $timeout s (replicas $cur, desired $des)" >&2
		fail=1
		return 1
	}
	show_history() {
		echo "k8s: the HPA's replica history is in $history" >&2
		cat "$history" >&2
		"${k[@]}" -n visionserve describe hpa visionserve >> "$d/checks.log" 2>&1 || true
	}
	both_metrics() { "${k[@]}" -n visionserve get hpa visionserve -o jsonpath='{.status.currentMetrics[*].type}' 2>/dev/null | grep -q 'Pods.*Resource\|Resource.*Pods'; }
	echo 0 > "$d/load"
	until_hpa "idle: the HPA reads both metrics and holds minReplicas (2)" 180 '[ "$cur" = 2 ] && [ "$ready" = 2 ] && both_metrics' || { show_history; return 1; }
	check "the custom metrics API serves visionserve_inflight_requests for the pods" bash -c \
		"'${k[0]}' --kubeconfig '$d/kubeconfig' get --raw '/apis/custom.metrics.k8s.io/v1beta2/namespaces/visionserve/pods/*/visionserve_inflight_requests' | grep -q '\"kind\":\"Pod\"'"
	check "the resource metrics API serves the pods' CPU" bash -c \
		"'${k[0]}' --kubeconfig '$d/kubeconfig' get --raw '/apis/metrics.k8s.io/v1beta1/namespaces/visionserve/pods' | grep -q '\"cpu\"'"
	echo 120 > "$d/load"
	until_hpa "load of 120 concurrent requests: scaled up to at least 3 (120 / 32 per pod)" 150 '[ "$cur" -ge 3 ] && [ "$ready" -ge 3 ]' || { show_history; return 1; }
	echo 224 > "$d/load"
	until_hpa "load of 224: scaled up to at least 6 (224 / 32)" 180 '[ "$cur" -ge 6 ] && [ "$ready" -ge 6 ]' || { show_history; return 1; }
	sleep 10
	record
	echo 0 > "$d/load"
	until_hpa "load stopped: scaled back down to 2" 240 '[ "$cur" = 2 ] && [ "$des" = 2 ]'
	record
	show_history
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
	if ! test_manifests "$d" || ! hpa_chain "$d"; then
		tail -30 "$d/checks.log" >&2
		if [ -n "${K8S_DEBUG:-}" ]; then
			for f in adapter prometheus controller-manager; do echo "--- $f.log" >&2; tail -20 "$d/$f.log" >&2; done
		fi
		exit 1
	fi
	;;
*) echo "usage: $0 [tools|all]" >&2; exit 2 ;;
esac
