package client

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

// TestOutputGolden pins the table and JSON output of classify and detect.
func TestOutputGolden(t *testing.T) {
	addr := startServer(t, 0)
	dir := t.TempDir()
	writeJPEG(t, filepath.Join(dir, "a.jpg"))
	writeJPEG(t, filepath.Join(dir, "b.png"))
	golden, err := filepath.Abs("testdata")
	if err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir) // relative image names keep the output stable
	for _, tt := range []struct {
		name string
		args []string
	}{
		{"classify_table", []string{"classify", "--addr", addr, "--model", "classify", "."}},
		{"detect_table", []string{"detect", "--addr", addr, "--model", "detect", "a.jpg", "b.png"}},
		{"detect_json", []string{"detect", "--addr", addr, "--model", "detect", "--json", "."}},
		{"models_table", []string{"models", "--addr", addr}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, code := runClient(t, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errOut)
			}
			path := filepath.Join(golden, tt.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if out != string(want) {
				t.Errorf("output differs from %s:\ngot:\n%s\nwant:\n%s", path, out, want)
			}
		})
	}
}
