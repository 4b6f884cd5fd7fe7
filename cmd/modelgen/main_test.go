package main

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/onnx"
)

func TestRun(t *testing.T) {
	tests := []struct {
		name      string
		args      []string // -out is added pointing at a fresh directory
		wantCode  int
		wantFiles []string
		wantSeed  string
		stderrHas []string
		stderrNot []string
	}{
		{name: "help", args: []string{"-h"}, wantCode: 0, stderrHas: []string{"usage: modelgen"}},
		{name: "unknown flag", args: []string{"-bogus"}, wantCode: 2, stderrHas: []string{"-bogus"}},
		{name: "unknown model", args: []string{"-models", "mobilenetv3_large,resnet18"}, wantCode: 2},
		{name: "no models", args: []string{"-models", " , "}, wantCode: 2},
		{name: "positional argument", args: []string{"models"}, wantCode: 2},
		{
			name: "quiet", args: []string{"-models", "mobilenetv3_large", "-seed", "7", "-quiet"},
			wantFiles: []string{"mobilenetv3_large/model.onnx"}, wantSeed: "7",
			stderrNot: []string{"mobilenetv3_large"},
		},
		{
			name: "progress", args: []string{"-models", " mobilenetv3_large "},
			wantFiles: []string{"mobilenetv3_large/model.onnx"}, wantSeed: "1",
			stderrHas: []string{"mobilenetv3_large: building (seed 1)", "5470832 parameters", "mobilenetv3_large/model.onnx: ", "(100%)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := t.TempDir()
			var stderr bytes.Buffer
			err := run(append([]string{"-out", out}, tc.args...), &stderr)
			if code := exitCode(err); code != tc.wantCode {
				t.Fatalf("exit code %d (err %v), want %d; stderr:\n%s", code, err, tc.wantCode, stderr.String())
			}
			var files []string
			filepath.WalkDir(out, func(path string, d fs.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					rel, _ := filepath.Rel(out, path)
					files = append(files, filepath.ToSlash(rel))
				}
				return nil
			})
			if !reflect.DeepEqual(files, tc.wantFiles) {
				t.Errorf("wrote %v, want %v", files, tc.wantFiles)
			}
			for _, s := range tc.stderrHas {
				if !strings.Contains(stderr.String(), s) {
					t.Errorf("stderr lacks %q:\n%s", s, stderr.String())
				}
			}
			for _, s := range tc.stderrNot {
				if strings.Contains(stderr.String(), s) {
					t.Errorf("stderr has %q:\n%s", s, stderr.String())
				}
			}
			if tc.wantSeed == "" {
				return
			}
			m, err := onnx.ReadModel(filepath.Join(out, tc.wantFiles[0]))
			if err != nil {
				t.Fatal(err)
			}
			var seed string
			for _, p := range m.GetMetadataProps() {
				if p.GetKey() == "visionserve.seed" {
					seed = p.GetValue()
				}
			}
			if seed != tc.wantSeed {
				t.Errorf("model metadata seed %q, want %q", seed, tc.wantSeed)
			}
		})
	}
}

// TestRunFailure checks that a write failure is reported with exit code 1.
func TestRunFailure(t *testing.T) {
	dir := t.TempDir()
	// A file where the model directory should go makes MkdirAll fail.
	blocker := filepath.Join(dir, "mobilenetv3_large")
	if err := os.WriteFile(blocker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err := run([]string{"-out", dir, "-models", "mobilenetv3_large", "-quiet"}, &bytes.Buffer{})
	if exitCode(err) != 1 || !strings.Contains(err.Error(), "mobilenetv3_large") {
		t.Errorf("err = %v (exit %d), want a generation error naming the model", err, exitCode(err))
	}
}
