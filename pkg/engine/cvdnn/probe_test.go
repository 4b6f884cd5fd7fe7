package cvdnn

import (
	"context"
	"os"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	// Probe re-executes this test binary; the child must probe, not test.
	RunProbeIfRequested()
	goleak.VerifyTestMain(m)
}

func TestProbe(t *testing.T) {
	good := writeModel(t, tinyClassifier(), "tiny_cls.onnx")
	bad := writeModel(t, unsupportedModel(), "unsupported.onnx")
	garbage := writeModel(t, nil, "garbage.onnx")
	if err := os.WriteFile(garbage, []byte("this is not a protobuf \xff\xff"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		model   string
		wantErr []string
	}{
		{"supported", good, nil},
		{"unsupported op aborts child", bad, []string{bad, "child process failed", "VisionserveNoSuchOp"}},
		{"not onnx", garbage, []string{garbage}},
		{"missing", bad + ".missing", []string{bad + ".missing"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Probe(context.Background(), tc.model)
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("Probe: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Probe succeeded on a model OpenCV cannot run")
			}
			t.Logf("Probe error: %v", err)
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Probe error %q does not mention %q", err, w)
				}
			}
		})
	}
}
