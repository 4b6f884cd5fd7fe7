package enginetest

import (
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/visionserve/visionserve/internal/testenv"
	"github.com/visionserve/visionserve/pkg/engine/cvdnn"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

func TestMain(m *testing.M) {
	// cvdnn probes models by re-executing this binary.
	cvdnn.RunProbeIfRequested()
	goleak.VerifyTestMain(m)
}

func testdata(t testing.TB, rel string) string {
	t.Helper()
	p, err := testenv.SharedTestdata(rel)
	if err != nil {
		t.Skip(err)
	}
	return p
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// generated loads a model that cmd/modelgen writes into models/ (or the
// repository in $VISIONSERVE_MODELS, for models generated elsewhere),
// skipping when it has not been generated.
func generated(t testing.TB, name string) *modelrepo.Model {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "models")
	if d := os.Getenv("VISIONSERVE_MODELS"); d != "" {
		dir = d
	}
	if _, err := os.Stat(filepath.Join(dir, name, "model.onnx")); err != nil {
		t.Skipf("models/%s/model.onnx missing: run make models (go run ./cmd/modelgen -out models)", name)
	}
	m, err := modelrepo.Load(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
