package machine

import (
	"strings"
	"testing"
)

// FuzzParseProc feeds arbitrary text to the /proc and os-release parsers:
// they must never panic, and what they return must come from the text.
func FuzzParseProc(f *testing.F) {
	f.Add("processor\t: 0\nmodel name\t: AMD EPYC\n", "MemTotal: 1024 kB\n", "PRETTY_NAME=\"Debian\"\n")
	f.Add("", "", "")
	f.Add(":::\nprocessor", "MemTotal: 99999999999999999999999 kB", "PRETTY_NAME=")
	f.Fuzz(func(t *testing.T, cpu, mem, osr string) {
		model, cores := parseCPUInfo(cpu)
		if cores < 0 || cores > strings.Count(cpu, "processor") {
			t.Fatalf("%d cores from %q", cores, cpu)
		}
		if model != "unknown" && !strings.Contains(cpu, model) {
			t.Fatalf("model %q not in the text", model)
		}
		if n := parseMemTotal(mem); n > 0 && !strings.Contains(mem, "MemTotal:") {
			t.Fatalf("%d bytes without MemTotal", n)
		}
		if name := osRelease(osr); name != "unknown" && !strings.Contains(osr, "PRETTY_NAME=") {
			t.Fatalf("os %q without PRETTY_NAME", name)
		}
	})
}
