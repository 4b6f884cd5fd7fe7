// Package deploy_test checks the Dockerfile against the pinned native
// versions in scripts/versions.env, which the Makefile and
// scripts/setup.sh read too: the image must get ONNX Runtime and OpenCV
// by the same versions and sha256 sums, never by a copy that can drift.
// No Docker engine runs in CI, so this reads the Dockerfile as text.
package deploy_test

import (
	"bufio"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/internal/ops"
)

// readVersions parses scripts/versions.env (KEY=VALUE lines, # comments).
func readVersions(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "scripts", "versions.env"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, val, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("versions.env: %q is not KEY=VALUE", line)
		}
		v[k] = strings.Trim(val, `"'`)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ORT_VERSION", "ORT_NPM_PACKAGE", "ORT_NPM_SHA256", "ORT_LIB_SHA256", "ORT_GPU_NPM_PACKAGE", "ORT_GPU_NPM_SHA256", "OPENCV_VERSION"} {
		if v[k] == "" {
			t.Fatalf("versions.env has no %s", k)
		}
	}
	return v
}

// instruction is one Dockerfile instruction, continuation lines joined,
// with the stage it belongs to.
type instruction struct {
	stage string
	op    string // upper case: FROM, RUN, ARG...
	args  string
}

// readDockerfile splits a Dockerfile into instructions, dropping comments.
func readDockerfile(t *testing.T, path string) []instruction {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []instruction
	var cur strings.Builder
	stage := ""
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		op, args, _ := strings.Cut(line, " ")
		in := instruction{stage: stage, op: strings.ToUpper(op), args: strings.TrimSpace(args)}
		if in.op == "FROM" {
			if _, name, ok := strings.Cut(strings.ToLower(in.args), " as "); ok {
				stage = strings.TrimSpace(name)
			} else {
				stage = ""
			}
			in.stage = stage
		}
		out = append(out, in)
	}
	for _, line := range strings.Split(string(raw), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") {
			continue
		}
		if strings.HasSuffix(trimmed, `\`) {
			cur.WriteString(strings.TrimSuffix(trimmed, `\`) + " ")
			continue
		}
		cur.WriteString(trimmed)
		flush()
	}
	flush()
	return out
}

func TestDockerfileUsesPinnedVersions(t *testing.T) {
	versions := readVersions(t)
	ins := readDockerfile(t, filepath.Join("..", "Dockerfile"))
	if len(ins) < 20 {
		t.Fatalf("only %d instructions in the Dockerfile", len(ins))
	}

	stages := map[string][]instruction{}
	args := map[string]string{}
	for _, in := range ins {
		stages[in.stage] = append(stages[in.stage], in)
		if in.op == "ARG" {
			name, def, _ := strings.Cut(in.args, "=")
			args[name] = def
		}
	}

	// An ARG named like a pinned version must default to it.
	for name, def := range args {
		if want, pinned := versions[name]; pinned && def != want {
			t.Errorf("ARG %s=%s, but scripts/versions.env says %s", name, def, want)
		}
	}

	// No pinned value is written out in an instruction: they come from
	// versions.env at build time. A sha256 or package@version literal here
	// would be a second copy that can drift.
	sha := regexp.MustCompile(`\b[0-9a-f]{64}\b`)
	for _, in := range ins {
		for _, h := range sha.FindAllString(in.args, -1) {
			t.Errorf("%s %s: literal sha256 %s; take it from scripts/versions.env", in.op, in.stage, h)
		}
		for _, k := range []string{"ORT_NPM_PACKAGE", "ORT_GPU_NPM_PACKAGE"} {
			if strings.Contains(in.args, versions[k]) {
				t.Errorf("%s in stage %s names %s literally; use $%s from scripts/versions.env", in.op, in.stage, versions[k], k)
			}
		}
		if in.op == "RUN" || in.op == "ENV" || in.op == "COPY" {
			if strings.Contains(in.args, versions["ORT_VERSION"]) {
				t.Errorf("%s in stage %s hard-codes ONNX Runtime %s", in.op, in.stage, versions["ORT_VERSION"])
			}
		}
	}

	// The ONNX Runtime core library comes from scripts/setup.sh, which
	// reads versions.env and checks both sha256 sums.
	ort := stages["ort"]
	if !hasInstruction(ort, "COPY", "scripts/versions.env") || !hasInstruction(ort, "RUN", "scripts/setup.sh ort") {
		t.Error("stage ort must copy scripts/versions.env and run scripts/setup.sh ort")
	}
	// The GPU provider package is fetched by the versions.env names and
	// checked against its sum.
	gpu := stages["ort-gpu"]
	if !hasInstruction(gpu, "RUN", ". scripts/versions.env") ||
		!hasInstruction(gpu, "RUN", `"$ORT_GPU_NPM_PACKAGE"`) ||
		!hasInstruction(gpu, "RUN", `$ORT_GPU_NPM_SHA256`) ||
		!hasInstruction(gpu, "RUN", "sha256sum -c") {
		t.Error("stage ort-gpu must source scripts/versions.env, npm pack $ORT_GPU_NPM_PACKAGE and sha256sum -c it against $ORT_GPU_NPM_SHA256")
	}
	if !hasInstruction(stages["build"], "RUN", `"$OPENCV_VERSION"`) {
		t.Error("the build stage must check the OpenCV headers against $OPENCV_VERSION")
	}

	// OpenCV is built in stage opencv by scripts/opencv.sh (which reads
	// versions.env and checks the source), and both targets take their
	// libraries from it. Debian's or Ubuntu's libopencv packages would bring
	// their runtime closure back (GDAL, ffmpeg, Qt: 320 MB).
	if !hasInstruction(stages["opencv"], "COPY", "scripts/versions.env") || !hasInstruction(stages["opencv"], "RUN", "scripts/opencv.sh /opt/opencv") {
		t.Error("stage opencv must copy scripts/versions.env and run scripts/opencv.sh /opt/opencv")
	}
	pkg := regexp.MustCompile(`\blibopencv-[a-z0-9-]+`)
	for _, target := range []string{"build", "cpu", "gpu"} {
		for _, in := range stages[target] {
			if m := pkg.FindString(in.args); m != "" {
				t.Errorf("stage %s installs %s; the images use the OpenCV of stage opencv", target, m)
			}
		}
		if target != "build" && !hasInstruction(stages[target], "COPY", "--from=opencv /out/opencv/lib/") {
			t.Errorf("stage %s does not copy the OpenCV libraries of stage opencv", target)
		}
	}
}

func TestDockerfileTargets(t *testing.T) {
	ins := readDockerfile(t, filepath.Join("..", "Dockerfile"))
	args := map[string]string{}
	stages := map[string][]instruction{}
	for _, in := range ins {
		stages[in.stage] = append(stages[in.stage], in)
		if in.op == "ARG" {
			name, def, _ := strings.Cut(in.args, "=")
			args[name] = def
		}
	}
	goMod, err := os.ReadFile(filepath.Join("..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(goMod)
	if goVersion == nil || args["GO_IMAGE"] != "golang:"+string(goVersion[1])+"-bookworm" {
		t.Errorf("GO_IMAGE %q, want golang:%s-bookworm (go.mod)", args["GO_IMAGE"], goVersion[1])
	}
	if args["CPU_BASE"] != "debian:bookworm-slim" {
		t.Errorf("CPU_BASE %q, want debian:bookworm-slim", args["CPU_BASE"])
	}
	if !regexp.MustCompile(`^nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04$`).MatchString(args["GPU_BASE"]) {
		t.Errorf("GPU_BASE %q, want a CUDA 13 cuDNN runtime image", args["GPU_BASE"])
	}
	if _, ok := args["GENERATE_MODELS"]; !ok || !hasInstruction(stages["models"], "RUN", "modelgen -out") {
		t.Error("want ARG GENERATE_MODELS running modelgen in stage models")
	}
	for _, target := range []string{"cpu", "gpu"} {
		s := stages[target]
		if len(s) == 0 {
			t.Errorf("no %s target", target)
			continue
		}
		var user, expose, ortLib string
		for _, in := range s {
			switch in.op {
			case "USER":
				user = in.args
			case "EXPOSE":
				expose = in.args
			case "ENV":
				if m := regexp.MustCompile(`VISIONSERVE_ORT_LIB=(\S+)`).FindStringSubmatch(in.args); m != nil {
					ortLib = m[1]
				}
			}
		}
		uid, _, _ := strings.Cut(user, ":")
		if n, err := strconv.Atoi(uid); err != nil || n == 0 {
			t.Errorf("%s: USER %q, want a numeric non-root uid (Kubernetes runAsNonRoot checks numbers)", target, user)
		}
		ports := strings.Fields(expose)
		for _, p := range []int{ops.DefaultGRPCPort, ops.DefaultHTTPPort} {
			if !slices.Contains(ports, strconv.Itoa(p)) {
				t.Errorf("%s: EXPOSE %q lacks %d", target, expose, p)
			}
		}
		if !strings.HasPrefix(ortLib, "/opt/onnxruntime/libonnxruntime.so") {
			t.Errorf("%s: VISIONSERVE_ORT_LIB=%q, want the library copied to /opt/onnxruntime", target, ortLib)
		}
		if !hasInstruction(s, "COPY", "/opt/onnxruntime/") || !hasInstruction(s, "ENTRYPOINT", "infer-server") {
			t.Errorf("%s: must copy ONNX Runtime and run infer-server", target)
		}
	}
}

// TestMakefileAndIgnoreFile checks the Makefile takes the same pins and
// that the build context leaves out what is fetched or generated.
func TestMakefileAndIgnoreFile(t *testing.T) {
	mk, err := os.ReadFile(filepath.Join("..", "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(mk), "include scripts/versions.env") {
		t.Error("the Makefile does not include scripts/versions.env")
	}
	if regexp.MustCompile(`\b[0-9a-f]{64}\b`).Match(mk) {
		t.Error("the Makefile holds a literal sha256; take it from scripts/versions.env")
	}
	ignore, err := os.ReadFile(filepath.Join("..", ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(ignore), "\n")
	for _, want := range []string{".git", ".deps", "models/*/*.onnx", "bin"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore does not leave out %s", want)
		}
	}
}

func hasInstruction(ins []instruction, op, substr string) bool {
	return slices.ContainsFunc(ins, func(in instruction) bool {
		return in.op == op && strings.Contains(in.args, substr)
	})
}
