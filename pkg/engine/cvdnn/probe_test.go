package cvdnn

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

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

func TestChildMessage(t *testing.T) {
	crash := "[ERROR:0@0.1] global onnx_importer.cpp (1018) handleNode DNN/ONNX: ERROR during processing node [MaxPool]\n" +
		"terminate called after throwing an instance of 'cv::Exception'\n  what():  OpenCV(4.6.0) error: unsupported attribute format\n> \n" +
		"SIGABRT: abort\nPC=0x7f20566a8eec m=0 sigcode=18446744073709551610\nsignal arrived during cgo execution\n\n" +
		"goroutine 1 gp=0xe178ce5e1e0 m=0 [syscall]:\nruntime.cgocall(0x6c2d50, 0xe178cfdfb08)\nrax    0x0\n"
	got := childMessage(crash)
	for _, want := range []string{"[MaxPool]", "what():  OpenCV(4.6.0) error: unsupported attribute format", "SIGABRT: abort"} {
		if !strings.Contains(got, want) {
			t.Errorf("childMessage lost %q: %q", want, got)
		}
	}
	for _, noise := range []string{"goroutine", "cgocall", "PC=", "rax"} {
		if strings.Contains(got, noise) {
			t.Errorf("childMessage kept %q: %q", noise, got)
		}
	}
	if got := childMessage("cvdnn-probe: opencv: output \"x\" is empty\n"); got != `cvdnn-probe: opencv: output "x" is empty` {
		t.Errorf("plain error: %q", got)
	}
}

// A probe that outlives its context is killed and says so.
func TestProbeTimeout(t *testing.T) {
	good := writeModel(t, tinyClassifier(), "tiny_cls.onnx")
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	time.Sleep(2 * time.Millisecond)
	err := Probe(ctx, good)
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") || !strings.Contains(err.Error(), good) {
		t.Fatalf("Probe past its deadline: %v, want a deadline error naming the model", err)
	}
}
