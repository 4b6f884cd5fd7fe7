package modelrepo

import (
	"strings"
	"testing"
	"time"
)

// TestBatchingTuneFields covers the self-tuning fields of batching:
// auto_tune and latency_target_p99 are read, and a target out of range is
// refused with the field named.
func TestBatchingTuneFields(t *testing.T) {
	tests := []struct {
		name     string
		batching string
		auto     bool
		target   time.Duration
		wantErr  string
	}{
		{"off by default", "", false, 0, ""},
		{"auto tune", "batching:\n  auto_tune: true\n", true, 0, ""},
		{"latency target", "batching:\n  latency_target_p99: 150ms\n", false, 150 * time.Millisecond, ""},
		{"negative target", "batching:\n  latency_target_p99: -5ms\n", false, 0, "batching.latency_target_p99 -5ms"},
		{"target too long", "batching:\n  latency_target_p99: 2h\n", false, 0, "batching.latency_target_p99 2h0m0s"},
		{"not a duration", "batching:\n  latency_target_p99: soon\n", false, 0, "soon"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			newModelDir(t, root, "cls", classifyConfig+tt.batching)
			m, err := Load(root, "cls")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.Batching.AutoTune != tt.auto || m.Batching.LatencyTargetP99 != tt.target {
				t.Errorf("batching %+v, want auto_tune %v, target %v", m.Batching, tt.auto, tt.target)
			}
		})
	}
}
