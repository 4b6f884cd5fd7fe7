package machine

import "testing"

func TestParseProc(t *testing.T) {
	cpu := "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
	if model, cores := parseCPUInfo(cpu); model != "AMD EPYC 7B13" || cores != 2 {
		t.Errorf("parseCPUInfo = %q, %d", model, cores)
	}
	if model, cores := parseCPUInfo(""); model != "unknown" || cores != 0 {
		t.Errorf("parseCPUInfo(\"\") = %q, %d", model, cores)
	}
	if got := parseMemTotal("MemTotal:       25165824 kB\nMemFree: 1 kB\n"); got != 24<<30 {
		t.Errorf("parseMemTotal = %d, want 24 GiB", got)
	}
	if got := parseMemTotal("MemTotal: lots kB\n"); got != 0 {
		t.Errorf("parseMemTotal of garbage = %d", got)
	}
	if got := osRelease("NAME=Debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"); got != "Debian GNU/Linux 12 (bookworm)" {
		t.Errorf("osRelease = %q", got)
	}
}
