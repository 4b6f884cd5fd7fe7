// Package k8s_test checks the Kubernetes manifests: every file decodes
// strictly into the Kubernetes API types (an unknown or misspelt field
// fails), the overlays render with kustomize as `kubectl apply -k` would,
// and what the rendered objects say agrees with what the server really
// serves: ports, probe paths, flags, the drain timing, and the metric the
// autoscaler scales on.
package k8s_test

import (
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/visionserve/visionserve/internal/config"
	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/ops"
)

// serviceMonitor holds the fields of a monitoring.coreos.com/v1
// ServiceMonitor these manifests use; strict decoding into it fails on
// any other field, so a field added to the manifest must be added here
// (from the operator's API reference) on purpose.
type serviceMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector *struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector,omitempty"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// adapterConfig is prometheus-adapter's rules file.
type adapterConfig struct {
	Rules []struct {
		SeriesQuery string `json:"seriesQuery"`
		Resources   struct {
			Overrides map[string]struct {
				Resource string `json:"resource"`
			} `json:"overrides"`
		} `json:"resources"`
		Name struct {
			Matches string `json:"matches"`
			As      string `json:"as"`
		} `json:"name"`
		MetricsQuery string `json:"metricsQuery"`
	} `json:"rules"`
}

// objects are the decoded resources of one rendering.
type objects struct {
	namespaces []corev1.Namespace
	deploys    []appsv1.Deployment
	services   []corev1.Service
	hpas       []autoscalingv2.HorizontalPodAutoscaler
	pdbs       []policyv1.PodDisruptionBudget
	monitors   []serviceMonitor
}

// decode strictly decodes one Kubernetes object by its kind into o.
func (o *objects) decode(doc []byte) error {
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		return err
	}
	strict := func(v any) error { return yaml.UnmarshalStrict(doc, v) }
	switch gvk := head.APIVersion + "/" + head.Kind; gvk {
	case "v1/Namespace":
		var v corev1.Namespace
		if err := strict(&v); err != nil {
			return err
		}
		o.namespaces = append(o.namespaces, v)
	case "apps/v1/Deployment":
		var v appsv1.Deployment
		if err := strict(&v); err != nil {
			return err
		}
		o.deploys = append(o.deploys, v)
	case "v1/Service":
		var v corev1.Service
		if err := strict(&v); err != nil {
			return err
		}
		o.services = append(o.services, v)
	case "autoscaling/v2/HorizontalPodAutoscaler":
		var v autoscalingv2.HorizontalPodAutoscaler
		if err := strict(&v); err != nil {
			return err
		}
		o.hpas = append(o.hpas, v)
	case "policy/v1/PodDisruptionBudget":
		var v policyv1.PodDisruptionBudget
		if err := strict(&v); err != nil {
			return err
		}
		o.pdbs = append(o.pdbs, v)
	case "monitoring.coreos.com/v1/ServiceMonitor":
		var v serviceMonitor
		if err := strict(&v); err != nil {
			return err
		}
		o.monitors = append(o.monitors, v)
	default:
		return fmt.Errorf("unexpected kind %s", gvk)
	}
	return nil
}

// TestEveryFileDecodesStrictly reads every YAML file under deploy/k8s
// as what it is: a kustomization, the adapter's rules, or a Kubernetes
// object.
func TestEveryFileDecodesStrictly(t *testing.T) {
	n := 0
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".yaml") {
			return err
		}
		n++
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		switch {
		case filepath.Base(path) == "kustomization.yaml":
			var k types.Kustomization
			if err := yaml.UnmarshalStrict(raw, &k); err != nil {
				t.Errorf("%s: %v", path, err)
			}
		case strings.HasPrefix(path, "prometheus-adapter"+string(filepath.Separator)):
			var c adapterConfig
			if err := yaml.UnmarshalStrict(raw, &c); err != nil {
				t.Errorf("%s: %v", path, err)
			}
		default:
			var o objects
			if err := o.decode(raw); err != nil {
				t.Errorf("%s: %v", path, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 10 {
		t.Fatalf("found only %d YAML files; is the test running in deploy/k8s?", n)
	}
}

// TestStrictDecodingRejectsTypos makes sure the decoding above can fail.
func TestStrictDecodingRejectsTypos(t *testing.T) {
	for name, doc := range map[string]string{
		"misspelt field":    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replica: 2}\n",
		"unknown SM field":  "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\nspec: {endpoints: [{port: http, honorLabel: true}]}\n",
		"duplicate key":     "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nmetadata: {name: y}\n",
		"wrong type":        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: x}\nspec: {minReplicas: two}\n",
		"unsupported kind":  "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
		"misspelt HPA part": "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: x}\nspec: {behaviour: {}}\n",
	} {
		var o objects
		if err := o.decode([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

// render builds an overlay as `kubectl apply -k` does and decodes each
// resource strictly.
func render(t *testing.T, overlay string) objects {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), filepath.Join("overlays", overlay))
	if err != nil {
		t.Fatalf("kustomize build overlays/%s: %v", overlay, err)
	}
	var o objects
	for _, r := range m.Resources() {
		doc, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		if err := o.decode(doc); err != nil {
			t.Fatalf("overlays/%s: %s %s: %v", overlay, r.GetKind(), r.GetName(), err)
		}
	}
	return o
}

// portOf returns the port number of a listen address such as ":8001".
func portOf(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return int32(n)
}

func TestOverlays(t *testing.T) {
	def := config.Default()
	grpcPort, httpPort, restPort := portOf(t, def.GRPCAddr), portOf(t, def.HTTPAddr), portOf(t, def.RESTAddr)
	if grpcPort != ops.DefaultGRPCPort || httpPort != ops.DefaultHTTPPort {
		t.Fatalf("config defaults (%d, %d) and ops constants (%d, %d) disagree", grpcPort, httpPort, ops.DefaultGRPCPort, ops.DefaultHTTPPort)
	}
	for _, c := range []struct {
		overlay  string
		backend  string
		gpu      bool
		imageTag string
	}{
		{"gpu", "auto", true, "-gpu"},
		{"cpu", "opencv", false, "-cpu"},
	} {
		t.Run(c.overlay, func(t *testing.T) {
			o := render(t, c.overlay)
			if len(o.deploys) != 1 || len(o.services) != 2 || len(o.hpas) != 1 || len(o.pdbs) != 1 || len(o.monitors) != 1 || len(o.namespaces) != 1 {
				t.Fatalf("rendered %d deployments, %d services, %d HPAs, %d PDBs, %d ServiceMonitors, %d namespaces; want 1, 2, 1, 1, 1, 1",
					len(o.deploys), len(o.services), len(o.hpas), len(o.pdbs), len(o.monitors), len(o.namespaces))
			}
			d := o.deploys[0]
			ns := o.namespaces[0].Name
			checkNamespaces(t, o, ns)
			pod := d.Spec.Template.Spec
			podLabels := labels.Set(d.Spec.Template.Labels)
			sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
			if err != nil || !sel.Matches(podLabels) {
				t.Fatalf("deployment selector %v does not match its pods %v (%v)", d.Spec.Selector, podLabels, err)
			}
			if d.Spec.Replicas != nil {
				t.Error("deployment sets replicas; the HPA owns them")
			}
			if len(pod.Containers) != 1 {
				t.Fatalf("%d containers, want 1", len(pod.Containers))
			}
			ctr := pod.Containers[0]

			// The server's own flag parser must accept the args, and they
			// must say what the overlay means.
			cfg, err := config.Load(ctr.Args, func(string) string { return "" }, nil)
			if err != nil {
				t.Fatalf("args %q: %v", ctr.Args, err)
			}
			if cfg.Backend != c.backend {
				t.Errorf("backend %q, want %q", cfg.Backend, c.backend)
			}
			if !strings.HasSuffix(ctr.Image, c.imageTag) {
				t.Errorf("image %q, want a tag ending in %s", ctr.Image, c.imageTag)
			}
			if portOf(t, cfg.GRPCAddr) != grpcPort || portOf(t, cfg.HTTPAddr) != httpPort {
				t.Errorf("args move the listen addresses to %s and %s", cfg.GRPCAddr, cfg.HTTPAddr)
			}

			ports := map[string]int32{}
			for _, p := range ctr.Ports {
				ports[p.Name] = p.ContainerPort
			}
			if ports["grpc"] != grpcPort || ports["http"] != httpPort || ports["rest"] != restPort {
				t.Errorf("container ports %v, want grpc %d, http %d and rest %d", ports, grpcPort, httpPort, restPort)
			}
			probe := func(name string, p *corev1.Probe, path string) {
				if p == nil || p.HTTPGet == nil {
					t.Errorf("%s probe missing or not HTTP", name)
					return
				}
				port := p.HTTPGet.Port.IntVal
				if p.HTTPGet.Port.Type == intstr.String {
					port = ports[p.HTTPGet.Port.StrVal]
				}
				if p.HTTPGet.Path != path || port != httpPort {
					t.Errorf("%s probe on %s port %d, want %s port %d", name, p.HTTPGet.Path, port, path, httpPort)
				}
			}
			probe("liveness", ctr.LivenessProbe, ops.HealthzPath)
			probe("readiness", ctr.ReadinessProbe, ops.ReadyzPath)
			probe("startup", ctr.StartupProbe, ops.HealthzPath)

			// The kubelet must let the drain finish: preStop, then the
			// server's grace period, inside terminationGracePeriodSeconds.
			preStop := preStopSeconds(t, ctr)
			tgps := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
			if need := preStop + cfg.GracePeriod; tgps <= need {
				t.Errorf("terminationGracePeriodSeconds %v <= preStop %v + --grace-period %v", tgps, preStop, cfg.GracePeriod)
			}

			// Models: the repository the server reads is the volume the
			// init container fills.
			mounts := map[string]string{}
			for _, m := range ctr.VolumeMounts {
				mounts[m.MountPath] = m.Name
			}
			vol, ok := mounts[cfg.ModelRepo]
			if !ok {
				t.Fatalf("--model-repo %s is no volume mount (%v)", cfg.ModelRepo, mounts)
			}
			filled := false
			for _, ic := range pod.InitContainers {
				for _, m := range ic.VolumeMounts {
					filled = filled || m.Name == vol
				}
				if ic.Image != ctr.Image {
					t.Errorf("init container image %q differs from the server's %q", ic.Image, ctr.Image)
				}
			}
			if !filled {
				t.Errorf("no init container fills the model volume %q", vol)
			}

			// Resources and the GPU.
			gpu := corev1.ResourceName("nvidia.com/gpu")
			for _, rl := range []corev1.ResourceList{ctr.Resources.Requests, ctr.Resources.Limits} {
				q, has := rl[gpu]
				if has != c.gpu || (has && q.Value() != 1) {
					t.Errorf("GPU resource %v (present %v), want present %v with 1", q.String(), has, c.gpu)
				}
				if rl.Cpu().IsZero() || rl.Memory().IsZero() {
					t.Errorf("CPU or memory missing in %v", rl)
				}
			}
			if hasGPUToleration := slices.ContainsFunc(pod.Tolerations, func(tl corev1.Toleration) bool { return tl.Key == string(gpu) }); hasGPUToleration != c.gpu {
				t.Errorf("GPU toleration present %v, want %v", hasGPUToleration, c.gpu)
			}

			// Non-root everywhere.
			if sc := pod.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.RunAsUser == nil || *sc.RunAsUser == 0 {
				t.Error("pod does not run as a non-root user")
			}
			for _, cc := range append(slices.Clone(pod.InitContainers), ctr) {
				sc := cc.SecurityContext
				if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
					t.Errorf("container %s may escalate privileges", cc.Name)
				}
			}

			checkServices(t, o, podLabels, ports)
			checkAutoscaling(t, o, d)
		})
	}
}

func preStopSeconds(t *testing.T, c corev1.Container) time.Duration {
	t.Helper()
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
		t.Fatal("no preStop hook")
	}
	h := c.Lifecycle.PreStop
	if h.Sleep != nil {
		return time.Duration(h.Sleep.Seconds) * time.Second
	}
	if h.Exec != nil && len(h.Exec.Command) == 2 && strings.HasSuffix(h.Exec.Command[0], "sleep") {
		n, err := strconv.Atoi(h.Exec.Command[1])
		if err == nil {
			return time.Duration(n) * time.Second
		}
	}
	t.Fatalf("preStop %+v is not a plain sleep", h)
	return 0
}

func checkNamespaces(t *testing.T, o objects, ns string) {
	t.Helper()
	for _, m := range []metav1.ObjectMeta{o.deploys[0].ObjectMeta, o.services[0].ObjectMeta, o.services[1].ObjectMeta, o.hpas[0].ObjectMeta, o.pdbs[0].ObjectMeta, o.monitors[0].Metadata} {
		if m.Namespace != ns {
			t.Errorf("%s is in namespace %q, want %q", m.Name, m.Namespace, ns)
		}
	}
}

func checkServices(t *testing.T, o objects, podLabels labels.Set, ports map[string]int32) {
	t.Helper()
	var clusterIP, headless *corev1.Service
	for i := range o.services {
		s := &o.services[i]
		if !labels.SelectorFromSet(s.Spec.Selector).Matches(podLabels) || len(s.Spec.Selector) == 0 {
			t.Errorf("service %s selects %v, not the pods %v", s.Name, s.Spec.Selector, podLabels)
		}
		for _, p := range s.Spec.Ports {
			target := p.TargetPort.IntVal
			if p.TargetPort.Type == intstr.String {
				target = ports[p.TargetPort.StrVal]
			}
			if target == 0 || target != ports[p.Name] || p.Port != target {
				t.Errorf("service %s port %s: %d -> %v, want the container's %s port %d", s.Name, p.Name, p.Port, p.TargetPort.String(), p.Name, ports[p.Name])
			}
		}
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			headless = s
		} else {
			clusterIP = s
		}
	}
	if clusterIP == nil || headless == nil {
		t.Fatal("want one ClusterIP and one headless service")
	}
	if headless.Name != "visionserve-headless" {
		t.Errorf("headless service is %q; docs/operations.md and the client example use visionserve-headless", headless.Name)
	}
	has := func(s *corev1.Service, name string) bool {
		return slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == name })
	}
	if !has(clusterIP, "grpc") || !has(clusterIP, "http") || !has(clusterIP, "rest") || !has(headless, "grpc") {
		t.Error("the ClusterIP service must carry grpc, http and rest, the headless one grpc")
	}

	// The ServiceMonitor scrapes /metrics on the ClusterIP service only,
	// so each pod is scraped once.
	sm := o.monitors[0]
	sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
	if err != nil {
		t.Fatal(err)
	}
	if !sel.Matches(labels.Set(clusterIP.Labels)) || sel.Matches(labels.Set(headless.Labels)) {
		t.Errorf("ServiceMonitor selector %v must match the ClusterIP service only", sm.Spec.Selector)
	}
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != "http" || sm.Spec.Endpoints[0].Path != ops.MetricsPath {
		t.Errorf("ServiceMonitor endpoints %+v, want port http path %s", sm.Spec.Endpoints, ops.MetricsPath)
	}
}

func checkAutoscaling(t *testing.T, o objects, d appsv1.Deployment) {
	t.Helper()
	h := o.hpas[0]
	if h.Spec.ScaleTargetRef.Kind != "Deployment" || h.Spec.ScaleTargetRef.Name != d.Name || h.Spec.ScaleTargetRef.APIVersion != "apps/v1" {
		t.Errorf("HPA targets %+v, not deployment %s", h.Spec.ScaleTargetRef, d.Name)
	}
	var podsMetric, cpu bool
	for _, m := range h.Spec.Metrics {
		switch m.Type {
		case autoscalingv2.PodsMetricSourceType:
			if m.Pods.Metric.Name != metrics.AutoscalingMetric {
				t.Errorf("HPA scales on %q, the server exports %q", m.Pods.Metric.Name, metrics.AutoscalingMetric)
			}
			if m.Pods.Target.Type != autoscalingv2.AverageValueMetricType || m.Pods.Target.AverageValue == nil || m.Pods.Target.AverageValue.IsZero() {
				t.Error("the Pods metric needs a non-zero AverageValue target")
			}
			podsMetric = true
		case autoscalingv2.ResourceMetricSourceType:
			if m.Resource.Name == corev1.ResourceCPU && m.Resource.Target.Type == autoscalingv2.UtilizationMetricType {
				cpu = true
			}
		}
	}
	if !podsMetric || !cpu {
		t.Errorf("HPA metrics: pods %v, CPU utilisation %v; want both", podsMetric, cpu)
	}
	b := h.Spec.Behavior
	if b == nil || b.ScaleDown == nil || b.ScaleDown.StabilizationWindowSeconds == nil || *b.ScaleDown.StabilizationWindowSeconds < 60 {
		t.Error("HPA needs a scale-down stabilisation window of at least a minute")
	}
	if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 2 || h.Spec.MaxReplicas < *h.Spec.MinReplicas {
		t.Errorf("HPA replicas %v..%d, want at least 2", h.Spec.MinReplicas, h.Spec.MaxReplicas)
	}

	// The disruption budget covers the pods and leaves one running.
	p := o.pdbs[0]
	sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
	if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Errorf("PDB selector %v does not match the pods", p.Spec.Selector)
	}
	if p.Spec.MaxUnavailable == nil && p.Spec.MinAvailable == nil {
		t.Error("PDB sets neither maxUnavailable nor minAvailable")
	}
	if p.Spec.MaxUnavailable != nil && p.Spec.MaxUnavailable.IntValue() >= int(*h.Spec.MinReplicas) {
		t.Errorf("PDB maxUnavailable %v would allow every pod of the minimum %d down", p.Spec.MaxUnavailable, *h.Spec.MinReplicas)
	}
}

// TestAdapterServesTheHPAMetric checks that prometheus-adapter's rules
// turn the series the server exports into the metric the HPA asks for.
func TestAdapterServesTheHPAMetric(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("prometheus-adapter", "rules.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c adapterConfig
	if err := yaml.UnmarshalStrict(raw, &c); err != nil {
		t.Fatal(err)
	}
	var hpaMetric string
	for _, m := range render(t, "gpu").hpas[0].Spec.Metrics {
		if m.Type == autoscalingv2.PodsMetricSourceType {
			hpaMetric = m.Pods.Metric.Name
		}
	}
	found := false
	for _, r := range c.Rules {
		if r.Name.As != hpaMetric {
			continue
		}
		found = true
		if !strings.HasPrefix(r.SeriesQuery, metrics.AutoscalingMetric+"{") && !strings.HasPrefix(r.SeriesQuery, "'"+metrics.AutoscalingMetric) {
			t.Errorf("rule for %s queries %q, not the exported %s", hpaMetric, r.SeriesQuery, metrics.AutoscalingMetric)
		}
		if r.Resources.Overrides["pod"].Resource != "pod" || r.Resources.Overrides["namespace"].Resource != "namespace" {
			t.Errorf("rule for %s does not map the pod and namespace labels: %+v", hpaMetric, r.Resources.Overrides)
		}
		if !strings.Contains(r.MetricsQuery, "<<.Series>>") || !strings.Contains(r.MetricsQuery, "<<.GroupBy>>") {
			t.Errorf("rule for %s: metricsQuery %q does not group per object", hpaMetric, r.MetricsQuery)
		}
	}
	if !found {
		t.Errorf("no adapter rule exposes %q", hpaMetric)
	}
	// Every series a rule reads is one the server exports.
	exported := []string{metrics.InflightRequests, metrics.StageDurationSeconds + "_bucket"}
	for _, r := range c.Rules {
		name, _, _ := strings.Cut(r.SeriesQuery, "{")
		if !slices.Contains(exported, name) {
			t.Errorf("adapter rule reads %q, which the server does not export", name)
		}
	}
}
