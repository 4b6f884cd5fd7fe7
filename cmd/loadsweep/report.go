package main

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/visionserve/visionserve/internal/machine"
)

// ModelSweep is the sweep of one model on one server.
type ModelSweep struct {
	Model   string  `json:"model"`
	Backend string  `json:"backend"`
	Task    string  `json:"task"`
	Addr    string  `json:"addr"`
	Image   string  `json:"image"`
	Points  []Point `json:"points"`
	// Plot is the PNG file of the latency-versus-throughput plot, relative
	// to the report.
	Plot string `json:"plot"`
}

// Report is a whole sweep run.
type Report struct {
	Date    time.Time       `json:"date"`
	Command string          `json:"command"`
	Machine machine.Machine `json:"machine"`
	// Step is how long each load was held; Warmup preceded each model.
	Step   time.Duration `json:"step_ns"`
	Warmup time.Duration `json:"warmup_ns"`
	Sweeps []ModelSweep  `json:"sweeps"`
}

// Headline is the figure a README quotes for one model: its peak
// throughput and its latency with a single client.
type Headline struct {
	Model, Backend string
	Peak           float64
	PeakAt         string
	P50One, P99One time.Duration
}

// oneClient is the single-client latency, or "not measured" when the
// sweep had no single-client point.
func (h Headline) oneClient() string {
	if h.P50One == 0 {
		return "not measured"
	}
	return ms(h.P50One) + " / " + ms(h.P99One) + " ms"
}

// headlines summarises every sweep.
func (r Report) headlines() []Headline {
	var hs []Headline
	for _, s := range r.Sweeps {
		h := Headline{Model: s.Model, Backend: s.Backend}
		for _, p := range s.Points {
			if p.Throughput > h.Peak {
				h.Peak, h.PeakAt = p.Throughput, p.Label()
			}
			if p.Mode == ModeClosed && p.Concurrency == 1 {
				h.P50One, h.P99One = p.P50, p.P99
			}
		}
		hs = append(hs, h)
	}
	return hs
}

// writeMarkdown writes the report: where and how it was measured, the
// headline figures, and per model a table of every point and its plot.
func (r Report) writeMarkdown(w io.Writer) error {
	var b strings.Builder
	m := r.Machine
	fmt.Fprintf(&b, "# Load sweep %s on %s\n\n", r.Date.UTC().Format("2006-01-02 15:04 MST"), m.Name)
	fmt.Fprintf(&b, "Command:\n\n```\n%s\n```\n\n", r.Command)
	b.WriteString("| | |\n|---|---|\n")
	rows := [][2]string{
		{"CPU", fmt.Sprintf("%s, %d logical cores", m.CPUModel, m.Cores)},
		{"Memory", fmt.Sprintf("%.1f GiB", float64(m.MemBytes)/(1<<30))},
		{"OS", fmt.Sprintf("%s, kernel %s", m.OS, m.Kernel)},
		{"Go", m.Go},
		{"ONNX Runtime", m.ORT},
		{"OpenCV", m.OpenCV},
		{"Git commit", m.Commit},
		{"Load average (1/5/15 min) at start / end", m.LoadStart + " / " + m.LoadEnd},
		{"Window per point", fmt.Sprintf("%v, after a %v warm-up per model", r.Step, r.Warmup)},
	}
	for _, row := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", row[0], mdEscape(row[1]))
	}
	b.WriteString("\nOne image per request. Closed loop: N clients, each sending its next request when the last returned. ")
	b.WriteString("Open loop: requests sent evenly spaced at a fixed rate whatever the answers; latency runs from the scheduled send time, ")
	b.WriteString("so a server that falls behind is charged for it.\n\n")

	b.WriteString("## Headline\n\n| model | backend | peak images/s | at | p50 / p99 at 1 client |\n|---|---|---:|---|---|\n")
	for _, h := range r.headlines() {
		fmt.Fprintf(&b, "| %s | %s | %.1f | %s | %s |\n", h.Model, h.Backend, h.Peak, h.PeakAt, h.oneClient())
	}
	for _, s := range r.Sweeps {
		fmt.Fprintf(&b, "\n## %s on %s\n\n", s.Model, s.Backend)
		fmt.Fprintf(&b, "Task %s, server %s, image %s.\n\n", s.Task, s.Addr, s.Image)
		b.WriteString("| load | requests | errors | images/s | p50 ms | p90 ms | p99 ms | notes |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
		for _, p := range s.Points {
			fmt.Fprintf(&b, "| %s | %d | %d | %.1f | %s | %s | %s | %s |\n", p.Label(), p.Requests, p.Errors, p.Throughput, ms(p.P50), ms(p.P90), ms(p.P99), notes(p))
		}
		if s.Plot != "" {
			fmt.Fprintf(&b, "\n![%s on %s: latency versus throughput](%s)\n", s.Model, s.Backend, s.Plot)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func notes(p Point) string {
	var n []string
	if p.Dropped > 0 {
		n = append(n, fmt.Sprintf("%d not sent (client at its in-flight limit)", p.Dropped))
	}
	codes := make([]string, 0, len(p.ErrorCodes))
	for c := range p.ErrorCodes {
		codes = append(codes, c)
	}
	slices.Sort(codes)
	for _, c := range codes {
		n = append(n, fmt.Sprintf("%s×%d", c, p.ErrorCodes[c]))
	}
	return strings.Join(n, ", ")
}

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) }

func trimFloat(f float64) string { return strconv.FormatFloat(f, 'f', -1, 64) }

func itoa(i int) string { return strconv.Itoa(i) }

func mdEscape(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
