// Package machine describes the machine a measurement ran on, for the
// reports of the load tools: hardware from /proc, versions, load average.
package machine

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Machine describes where a sweep ran: the hardware from /proc and the
// versions of what served.
type Machine struct {
	Name     string `json:"name"`
	CPUModel string `json:"cpu_model"`
	// Cores is the number of logical CPUs /proc/cpuinfo lists.
	Cores    int    `json:"cores"`
	MemBytes uint64 `json:"mem_bytes"`
	OS       string `json:"os"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
	ORT      string `json:"onnxruntime"`
	OpenCV   string `json:"opencv"`
	Commit   string `json:"git_commit"`
	// LoadStart and LoadEnd are /proc/loadavg when the sweep began and
	// ended: the machine may be shared.
	LoadStart string `json:"load_start"`
	LoadEnd   string `json:"load_end"`
}

// Read gathers what it can; what it cannot read is "unknown".
func Read(ctx context.Context, name string) Machine {
	m := Machine{Name: name, Go: runtime.Version(), CPUModel: "unknown", OS: "unknown", Kernel: "unknown"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		m.CPUModel, m.Cores = parseCPUInfo(string(b))
	}
	if m.Cores == 0 {
		m.Cores = runtime.NumCPU()
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		m.MemBytes = parseMemTotal(string(b))
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		m.OS = osRelease(string(b))
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.LoadStart = LoadAvg()
	m.OpenCV = Command(ctx, "pkg-config", "--modversion", "opencv4")
	m.Commit = gitCommit(ctx)
	m.ORT = ortVersion(ctx)
	return m
}

// parseCPUInfo returns the CPU model name and the number of logical CPUs
// of /proc/cpuinfo text.
func parseCPUInfo(text string) (model string, cores int) {
	model = "unknown"
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "processor":
			cores++
		case "model name":
			if model == "unknown" {
				model = strings.TrimSpace(v)
			}
		}
	}
	return model, cores
}

// parseMemTotal returns MemTotal of /proc/meminfo text in bytes, 0 when
// absent.
func parseMemTotal(text string) uint64 {
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}

// osRelease returns PRETTY_NAME of /etc/os-release text.
func osRelease(text string) string {
	for line := range strings.Lines(text) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "unknown"
}

// LoadAvg is the first three fields of /proc/loadavg, or "unknown": the
// machine may be shared, so reports say how busy it was.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// Command runs a short command and returns its trimmed output, or
// "unknown".
func Command(ctx context.Context, name string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// gitCommit is the short commit of the working tree, marked "-dirty" when
// tracked files differ from it.
func gitCommit(ctx context.Context) string {
	c := Command(ctx, "git", "rev-parse", "--short=12", "HEAD")
	if c == "unknown" {
		return c
	}
	if Command(ctx, "git", "status", "--porcelain", "--untracked-files=no") != "" {
		c += "-dirty"
	}
	return c
}

// ortVersion is the ONNX Runtime the server loads: the version in the
// library's file name ($VISIONSERVE_ORT_LIB), else the repository's
// pinned ORT_VERSION.
func ortVersion(ctx context.Context) string {
	if lib := os.Getenv("VISIONSERVE_ORT_LIB"); lib != "" {
		base := filepath.Base(lib)
		if _, v, ok := strings.Cut(base, ".so."); ok {
			return v + " (" + base + ")"
		}
	}
	root := Command(ctx, "git", "rev-parse", "--show-toplevel")
	if b, err := os.ReadFile(filepath.Join(root, "scripts", "versions.env")); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "ORT_VERSION="); ok {
				return v + " (pinned in scripts/versions.env)"
			}
		}
	}
	return "unknown"
}
