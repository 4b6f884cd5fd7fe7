package main

import (
	"strings"
	"testing"
	"time"
)

func TestParsers(t *testing.T) {
	if got := parseVmRSS(strings.NewReader("Name:\tx\nVmRSS:\t  1024 kB\nVmData: 5 kB\n")); got != 1<<20 {
		t.Errorf("VmRSS %d, want 1 MiB", got)
	}
	metrics := `# HELP visionserve_inflight_requests x
visionserve_inflight_requests{model="a"} 2
visionserve_inflight_requests{model="b"} 3
visionserve_inflight_requests_other 7
go_goroutines 12
`
	if got := sumFamily(strings.NewReader(metrics), "visionserve_inflight_requests"); got != 5 {
		t.Errorf("in flight %v, want 5", got)
	}
	if got := sumFamily(strings.NewReader(metrics), "go_goroutines"); got != 12 {
		t.Errorf("goroutines %v, want 12", got)
	}
}

func TestParseStatCPU(t *testing.T) {
	stat := "1234 (infer server) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 100 1000 200"
	if got := parseStatCPU(stat); got != 3*time.Second {
		t.Errorf("cpu %v, want 3s", got)
	}
}
