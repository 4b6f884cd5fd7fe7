package config

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(file, []byte("grpc_addr: file:1\nhttp_addr: file:2\nmax_streams: 7\ngrace_period: 3s\nbackend: opencv\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want func(c Config) bool
	}{
		{"defaults", nil, nil, func(c Config) bool { return reflect.DeepEqual(c, Default()) }},
		{"file over default", []string{"--config", file}, nil, func(c Config) bool {
			return c.GRPCAddr == "file:1" && c.MaxStreams == 7 && c.GracePeriod == 3*time.Second && c.ModelRepo == "./models"
		}},
		{"file from env", nil, map[string]string{"VISIONSERVE_CONFIG": file}, func(c Config) bool { return c.GRPCAddr == "file:1" }},
		{"env over file", []string{"--config", file}, map[string]string{"VISIONSERVE_GRPC_ADDR": "env:1", "VISIONSERVE_MAX_STREAMS": "9"}, func(c Config) bool {
			return c.GRPCAddr == "env:1" && c.HTTPAddr == "file:2" && c.MaxStreams == 9
		}},
		{"flag over env", []string{"--config", file, "--grpc-addr", "flag:1", "--max-pixels", "40e6"}, map[string]string{"VISIONSERVE_GRPC_ADDR": "env:1", "VISIONSERVE_AUTH_TOKEN": "tok"}, func(c Config) bool {
			return c.GRPCAddr == "flag:1" && c.AuthToken == "tok" && c.MaxPixels == 40_000_000 && c.Backend == "opencv"
		}},
		{"gpu settings", []string{"--gpu-failover", "retry", "--tensorrt-fp16", "true", "--gpu-memory-budget", "8e9", "--gpu-batch-padding", "max"}, map[string]string{"VISIONSERVE_TENSORRT_CACHE_DIR": "/cache"}, func(c Config) bool {
			return c.GPUFailover == "retry" && c.GPUBatchPadding == "max" && c.TensorRTFP16 && c.GPUMemoryBudget == 8e9 && c.TensorRTCacheDir == "/cache"
		}},
		{"flag equal to default still wins", []string{"--config", file, "--backend", "auto"}, nil, func(c Config) bool { return c.Backend == "auto" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Load(tt.args, env(tt.env), io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.want(c) {
				t.Errorf("got %+v", c)
			}
		})
	}
}

func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	unknownKey := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(unknownKey, []byte("grpc_adr: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"unknown backend", []string{"--backend", "tpu"}, nil, `unknown backend "tpu"`},
		{"bad int env", nil, map[string]string{"VISIONSERVE_MAX_STREAMS": "many"}, "VISIONSERVE_MAX_STREAMS"},
		{"bad duration", []string{"--grace-period", "soon"}, nil, "--grace-period"},
		{"unknown yaml key", []string{"--config", unknownKey}, nil, "grpc_adr"},
		{"missing file", []string{"--config", filepath.Join(dir, "none.yaml")}, nil, "reading config file"},
		{"cert without key", []string{"--tls-cert", "a.pem"}, nil, "tls-cert and tls-key go together"},
		{"client ca without tls", []string{"--tls-client-ca", "ca.pem"}, nil, "tls-client-ca needs"},
		{"zero streams", []string{"--max-streams", "0"}, nil, "max-streams 0 out of range"},
		{"tiny messages", []string{"--max-message-bytes", "10"}, nil, "max-message-bytes 10 out of range"},
		{"stray argument", []string{"models"}, nil, "unexpected arguments"},
		{"unknown flag", []string{"--nope"}, nil, "flag provided but not defined"},
		{"log format", []string{"--log-format", "xml"}, nil, `log-format "xml"`},
		{"gpu failover mode", []string{"--gpu-failover", "maybe"}, nil, `gpu-failover "maybe" unknown`},
		{"gpu batch padding", []string{"--gpu-batch-padding", "some"}, nil, `gpu-batch-padding "some" unknown`},
		{"negative gpu budget", nil, map[string]string{"VISIONSERVE_GPU_MEMORY_BUDGET": "-1"}, "gpu-memory-budget -1 is negative"},
		{"bad bool", []string{"--tensorrt-fp16", "perhaps"}, nil, `"perhaps" is not true or false`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(tt.args, env(tt.env), io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}

func FuzzConfigFile(f *testing.F) {
	f.Add([]byte("grpc_addr: :1\nmax_streams: 3\n"))
	f.Add([]byte("grace_period: 1s\n"))
	f.Add([]byte("{"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c := Default()
		if err := decodeYAML(&c, b); err != nil {
			return
		}
		_ = c.Validate()
	})
}

func TestModelControlFlags(t *testing.T) {
	env := func(k string) string {
		if k == "VISIONSERVE_MODEL" {
			return "/env/a.onnx"
		}
		return ""
	}
	c, err := Load([]string{"--model", "/x/a.onnx", "--model", "/y/b.onnx", "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b"}, env, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Models, []string{"/x/a.onnx", "/y/b.onnx"}) || !slices.Equal(c.LoadModels, []string{"a", "b"}) || c.ModelControlMode != "explicit" {
		t.Errorf("models %q, load %q, mode %q", c.Models, c.LoadModels, c.ModelControlMode)
	}
	if c, err := Load([]string{"--precision", "fp16", "--backend", "ort-cuda"}, env, io.Discard); err != nil || c.Precision != "fp16" {
		t.Errorf("fp16 on ort-cuda: %q %v", c.Precision, err)
	}
	if c, err := Load(nil, env, io.Discard); err != nil || !slices.Equal(c.Models, []string{"/env/a.onnx"}) {
		t.Errorf("from the environment: %q %v", c.Models, err)
	}
	for _, bad := range [][]string{
		{"--model-control-mode", "sometimes"},
		{"--load-model", "a"}, // needs explicit
		{"--model", "weights.bin"},
		{"--repository-poll-interval", "1ms"},
		{"--precision", "half"},
		{"--precision", "fp16", "--backend", "ort-cpu"},
	} {
		if _, err := Load(bad, func(string) string { return "" }, io.Discard); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
