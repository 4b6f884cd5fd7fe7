package engine_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestContractLinksNoNativeCode keeps the engine contract and the batcher
// buildable and testable anywhere: neither they nor anything they import
// may use cgo or pull in OpenCV, and no pkg/ package imports internal/.
func TestContractLinksNoNativeCode(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not on PATH")
	}
	for _, pkg := range []string{"github.com/visionserve/visionserve/pkg/engine", "github.com/visionserve/visionserve/pkg/batcher"} {
		out, err := exec.Command(goTool, "list", "-deps", "-f", "{{.ImportPath}} {{len .CgoFiles}}", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", pkg, err, out)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			dep, cgoFiles, _ := strings.Cut(line, " ")
			if strings.Contains(dep, "gocv") || (cgoFiles != "0" && dep != "runtime/cgo") {
				t.Errorf("%s depends on %s (%s cgo files)", pkg, dep, cgoFiles)
			}
		}
	}
	out, err := exec.Command(goTool, "list", "-f", "{{.ImportPath}}: {{join .Imports \" \"}}", "github.com/visionserve/visionserve/pkg/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list pkg/...: %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		pkg, imports, _ := strings.Cut(line, ": ")
		for _, imp := range strings.Fields(imports) {
			if strings.HasPrefix(imp, "github.com/visionserve/visionserve/internal/") {
				t.Errorf("%s imports %s: pkg/ is a public API", pkg, imp)
			}
		}
	}
}
